"""`cxr train`: train the CNN/RNN cascade on a data source into a run directory (resumable).

    cxr train --data openi:~/data/openi --out runs/openi --backbone googlenet
    cxr train --data phantom --out runs/demo --backbone tiny --image-size 128 --crop 112
    cxr train --data openi:~/data/openi --out runs/shin --labels shin2016 --operating-point specificity=0.8
    torchrun --nproc_per_node 4 -m cxr.cli train --data nih:~/data/nih --out runs/nih   # DDP, one GPU each

Every TrainConfig field is a flag (`--image-size`, `--no-cascade`, `--class-weighted`, ...);
`--config FILE` reads them from JSON (a run's config.json works: its train_config is used).
Running the same command again continues an interrupted run from its last finished epoch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

HELP = {
    "data": "SOURCE[:PATH]: openi:DIR, nih:DIR, folder:DIR[,CSV], phantom:DIR, or `phantom` alone "
            "(simulate --phantom-n images into the cache first)",
    "backbone": "CNN: tiny | nin | googlenet | densenet121",
    "rnn": "annotator cell: gru | lstm",
    "image_size": "images are resized to this square once (disk cache)",
    "crop": "random crop during training (inference sees the whole image)",
    "epochs": "CNN epochs before the cascade",
    "cascade_epochs": "CNN epochs on the refined labels (default: --epochs)",
    "rnn_epochs": "RNN epochs in each stage",
    "data_dropout": "Shin et al.'s data dropout: keep normals with p=4*n_max/n_normal, duplicate rare classes",
    "class_weighted": "weight positives by neg/pos per label in the BCE",
    "cascade": "refine labels by k-means of the joint image/text contexts and retrain",
    "min_cluster_members": "labels with fewer training (image, finding) pairs are not split",
    "images_per_cluster": "k = members // this",
    "min_label_count": "a disease is a target with at least this many training images",
    "views": "frontal | lateral | all",
    "device": "auto | cpu | cuda | cuda:N (torchrun sets one per process)",
    "amp": "mixed precision on CUDA",
    "pretrained": "CNN to start from: a cxr run folder (its CNN, e.g. a phantom run) or a state dict (safetensors or weights-only torch file)",
    "cache_dir": "where the decoded image cache goes (default RUN/cache)",
    "max_images": "use only the first N studies (quick trials)",
    "fractions": "train val test fractions, by patient",
    "labels": "diseases: one sigmoid output per disease, multi-label | shin2016: Shin et al.'s one "
              "pattern per image (the `cxr labels` space), softmax, top-1 accuracy",
    "batch_norm": "batch norm in the CNN (off: a per-channel scale and shift instead)",
    "operating_point": "what the study-level normal/abnormal threshold is chosen for on the validation "
                       "patients: sensitivity=S, specificity=S or f1",
    "pooling": "CNN head pooling: class_lse (each disease's own map, its CAM, pooled by log-sum-exp with a "
               "sharpness it learns; normal keeps the mean) | avg (CAM's average pooling) | lse (ChestX-ray8's "
               "log-sum-exp of the features, sharpness --lse-r)",
    "boxes": "how heatmaps become boxes: chestxray8 (the paper's: a box around each region above 180/255 "
             "and each above 60/255; better by IoBB and IoU on phantom and real films) | threshold (one "
             "threshold, --localize-threshold)",
    "box_source": "the map a detected finding's boxes and heatmap come from: cam | attention (the grounded "
                  "annotator's finding map) | word (its map while writing the finding's word) | auto: the "
                  "finding map when at least a tenth of the training annotations name a side or site (what "
                  "teaches that map where), else the word map (on real NIH films, whose labels name none, "
                  "it localised better than the finding map and the CAM)",
    "lse_r": "sharpness of --pooling lse (small: average, large: max); class_lse learns its own",
    "transition": "ChestX-ray8 transition layer width before pooling (0: none)",
    "members": "CNN trunks side by side in one network, each trained on its own loss, with its own "
               "bootstrap weights of the images and from its own initialisation, their logits "
               "averaged: an ensemble that reads, exports and annotates as one model (K times the "
               "CNN's time)",
    "ensemble": "K networks trained one after another from seeds seed..seed+K-1 on one patient split, "
                "then merged into one run: their CNNs become the members of one network (logits "
                "averaged), the first network's annotator writes the words and draws the maps; "
                "calibrated and its operating points chosen on the shared validation patients (K "
                "times the training time and the CNN's reading time; needs --no-cascade)",
    "split_seed": "seed of the patient split (default: --seed)",
    "annotator": "grounded (attends over the feature map; words from where it looks) | global (Shin's)",
    "ground_epochs": "epochs of the joint CNN + grounded annotator phase",
    "ground_lr": "learning rate of that phase",
    "ground_cnn_lr": "the CNN's learning rate in that phase, as a fraction of ground_lr (1: as fast as the annotator)",
    "attn_dim": "width of the grounded annotator's regions and attention",
    "labels_from": "labels: the source's own labels (MeSH terms, label table, manifest column) | report: "
                   "diseases and their side/site/severity mined from each study's report text "
                   "(kept in RUN/mined_labels.jsonl; `cxr labels --audit RUN` scores them)",
    "uncertain": "with --labels-from report, an uncertain mention (\"cannot exclude pneumonia\"): ignore "
                 "(masked out of the loss) | positive | negative (CheXpert's U-Ignore/U-Ones/U-Zeros)",
    "report_text": "teach the grounded annotator with report cross-attention (training only)",
    "side_mil": "weight of the side-word loss in the CNN phases: a training-only head's map per finding, "
                "pooled (LSE) over each image half, learns from the side words alone which half holds it "
                "(\"left\": the image's right half on a PA film), teaching the CNN where findings lie; 0: off",
}
SKIP = {"progress"}


def _type(field: dataclasses.Field):
    hint = typing.get_type_hints(_config_class())[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _config_class():
    from ..training.config import TrainConfig

    return TrainConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="run directory (created; resumed if it holds "
                                                                "an interrupted run with the same settings)")
    parser.add_argument("--config", type=Path, help="JSON file of TrainConfig fields (flags override it)")
    parser.add_argument("--phantom-n", type=int, default=1000, help="images to simulate for `--data phantom`")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out (the default when its settings match)")
    resume.add_argument("--fresh", action="store_true",
                        help="refuse to continue an existing partial run in --out")
    for f in dataclasses.fields(_config_class()):
        if f.name in SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _type(f)
        default = f.default
        text = HELP.get(f.name, "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {'on' if default else 'off'})")
        elif f.name == "fractions":
            parser.add_argument(flag, type=float, nargs=3, default=None, help=f"{text} (default: 0.7 0.1 0.2)")
        else:
            parser.add_argument(flag, type=kind if kind in (int, float) else str, default=None,
                                help=f"{text} (default: {default})".strip())


def _phantom_default(n: int, size: int, seed: int) -> str:
    """`--data phantom`: simulate once into the cache and reuse it."""
    from ..data import data_dir
    from ..phantom.simulate import simulate

    out = data_dir() / "phantom" / f"simulated-n{n}-s{size}-seed{seed}"
    simulate(out, n=n, size=size, seed=seed, progress=True)
    return f"phantom:{out}"


def run(args) -> int:
    from ..checkpoint import load_spec
    from ..errors import CxrError
    from ..training import TrainConfig, train

    settings = {}
    if args.config:
        try:
            settings = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CxrError(f"cannot read the config: {exc}", args.config) from None
        if isinstance(settings, dict) and "format" in settings:  # a run's config.json works too
            from ..runspec import RunSpec

            settings = dict(RunSpec.from_dict(settings, args.config).train_config)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    settings["progress"] = not args.no_progress
    config = TrainConfig.from_dict(settings)
    if getattr(args, "localize_threshold", None) is not None and config.boxes != "threshold":
        # it would be stored and never used: ChestX-ray8's rule has its own two thresholds
        raise CxrError(f"--localize-threshold applies to --boxes threshold only (this run's box rule "
                       f"is {config.boxes}: regions above 180/255 and above 60/255); add --boxes threshold")
    if config.data.strip() == "phantom":
        config.data = _phantom_default(args.phantom_n, config.image_size, config.seed)
    out = train(config, args.out, resume=not args.fresh)
    spec = load_spec(out)
    val = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                    for k, v in spec.validation.items())
    print(f"trained {out}: {len(spec.targets)} targets "
          f"({len(spec.refined.names)} refined); validation: {val or 'none'}")
    return 0
