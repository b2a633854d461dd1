"""CNN backbones for 1-channel radiographs, all behind one interface (timm-like).

Every network here ends in feature maps -> global pooling -> one linear layer, because class
activation maps (CAM, used for localisation) need exactly that head. The last feature map has a
stride of at most 16 (16x16 or finer at 256 px): the localisation heatmaps and the grounded
annotator's attention are only as fine as this map, so the ImageNet layouts' last 2x pooling is
left out (an Identity keeps the parameter names, so pretrained weights still load). Pooling is
average (CAM's), ChestX-ray8's log-sum-exp of the features (`pooling="lse"`, sharpness `lse_r`,
after a `transition` 3x3 conv layer), or `class_lse`: each class's own map (its CAM) pooled by
log-sum-exp with a sharpness that class learns (`ClassMapHead`), so a small lesion is not
averaged away while `normal`, a property of the whole film, stays the plain mean. Backbones by name:

- ``nin``: Network-in-Network (Lin et al. 2014) with batch norm, as Shin et al. 2016 used.
- ``googlenet``: GoogLeNet / Inception v1 with batch norm (Shin et al.'s stronger model).
- ``densenet121``: MONAI's DenseNet-121 (CheXNet's network), 2-D, 1 input channel.
- ``tiny``: four conv blocks, for tests and the CPU demo (stride 8).

`members=K` builds K such trunks side by side, an ensemble inside one network: their feature
maps are concatenated (K x C channels) and the head's logit is the mean of the members' own
logits (`MemberHead`), so everything downstream (CAM, the annotators, the embedding, the exported
graph) reads one wider map. In training each member is scored on its own (`forward(x,
members=True)`), with its own Poisson(1) weight per image (online bagging), so the members learn
as separately trained models would, from different initialisations and bootstrap samples.

All are trained from scratch by default; `load_pretrained` takes a user-given state dict.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CxrError
from ..runspec import POOLINGS

BACKBONES = ("tiny", "nin", "googlenet", "densenet121")


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, pad: int | None = None) -> nn.Sequential:
    pad = k // 2 if pad is None else pad
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyFeatures(nn.Sequential):
    def __init__(self, in_chans: int = 1, width: int = 16):
        w = width
        super().__init__(conv_bn(in_chans, w, 5, 2), nn.MaxPool2d(2),
                         conv_bn(w, 2 * w, 3), nn.MaxPool2d(2),
                         conv_bn(2 * w, 4 * w, 3), conv_bn(4 * w, 4 * w, 3))
        self.num_features = 4 * w


def mlpconv(cin: int, cout: int, k: int, stride: int, pad: int) -> nn.Sequential:
    """A NIN block: one spatial conv followed by two 1x1 convs (the 'micro network')."""
    return nn.Sequential(conv_bn(cin, cout, k, stride, pad), conv_bn(cout, cout, 1), conv_bn(cout, cout, 1))


class NINFeatures(nn.Sequential):
    """Network-in-Network (ImageNet layout) with batch norm; the last mlpconv gives 1024 maps."""

    def __init__(self, in_chans: int = 1):
        super().__init__(
            mlpconv(in_chans, 96, 11, 4, 5), nn.MaxPool2d(3, 2, ceil_mode=True),
            mlpconv(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2, ceil_mode=True),
            mlpconv(256, 384, 3, 1, 1), nn.Identity(),  # ImageNet NIN pools here: stride 32
            nn.Dropout(0.5), mlpconv(384, 1024, 3, 1, 1))
        self.num_features = 1024


class Inception(nn.Module):
    """Inception v1 module with batch norm (Szegedy et al. 2015; BN as in Ioffe & Szegedy)."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b2 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 3), conv_bn(c5, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNetFeatures(nn.Sequential):
    """GoogLeNet with batch norm, no auxiliary heads (BN makes them unnecessary); 1024 maps."""

    def __init__(self, in_chans: int = 1):
        super().__init__(
            conv_bn(in_chans, 64, 7, 2, 3), nn.MaxPool2d(3, 2, ceil_mode=True),
            conv_bn(64, 64, 1), conv_bn(64, 192, 3), nn.MaxPool2d(3, 2, ceil_mode=True),
            Inception(192, 64, 96, 128, 16, 32, 32), Inception(256, 128, 128, 192, 32, 96, 64),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Inception(480, 192, 96, 208, 16, 48, 64), Inception(512, 160, 112, 224, 24, 64, 64),
            Inception(512, 128, 128, 256, 24, 64, 64), Inception(512, 112, 144, 288, 32, 64, 64),
            Inception(528, 256, 160, 320, 32, 128, 128), nn.Identity(),  # ImageNet: pool, stride 32
            Inception(832, 256, 160, 320, 32, 128, 128), Inception(832, 384, 192, 384, 48, 128, 128))
        self.num_features = 1024


class DenseNet121Features(nn.Module):
    """MONAI's DenseNet-121 trunk (2-D, 1 channel) plus the final ReLU of its class layers."""

    def __init__(self, in_chans: int = 1):
        super().__init__()
        from monai.networks.nets import DenseNet121

        self.trunk = DenseNet121(spatial_dims=2, in_channels=in_chans, out_channels=1).features
        self.trunk.transition3.pool = nn.Identity()  # stride 16, not 32
        self.num_features = 1024

    def forward(self, x):
        return F.relu(self.trunk(x))


_FEATURES = {"tiny": TinyFeatures, "nin": NINFeatures, "googlenet": GoogLeNetFeatures,
             "densenet121": DenseNet121Features}


CLASS_LSE_R0 = 1.0  # the sharpness every class map's log-sum-exp pooling starts from


class MemberFeatures(nn.Module):
    """K backbone trunks on the same image, maps concatenated along the channels (member k owns
    channels k*C .. (k+1)*C - 1)."""

    def __init__(self, backbone: str, in_chans: int, members: int):
        super().__init__()
        self.trunks = nn.ModuleList(_FEATURES[backbone](in_chans) for _ in range(members))
        self.member_features = self.trunks[0].num_features
        self.num_features = members * self.member_features

    def forward(self, x):
        """x (B, c, H, W) for all members, or (K, B, c, H, W): one view per member (training
        gives each member its own augmentation)."""
        views = x if x.dim() == 5 else [x] * len(self.trunks)
        return torch.cat([trunk(v) for trunk, v in zip(self.trunks, views)], 1)


def lse_pool(maps: torch.Tensor, r: float | torch.Tensor) -> torch.Tensor:
    """ChestX-ray8's log-sum-exp pooling of (..., h, w) maps over h, w: (1/r) log(mean exp(r x));
    r -> 0 is the mean, r -> inf the max; r a number or a tensor broadcast against (..., 1).
    Computed around the max so that exp never overflows."""
    flat = maps.flatten(-2)
    top = flat.amax(-1, keepdim=True)
    return (top + torch.log(torch.exp(r * (flat - top)).mean(-1, keepdim=True)) / r)[..., 0]


class MemberHead(nn.Module):
    """The linear head of K members. Each member's own weights (classes, C) are `member_weight`'s
    k-th block of channels, at the scale of a single model's head (so they learn at its pace);
    `weight`, their sum's share, member_weight / K, is what the mean of the members' logits
    applies to the concatenated pooled maps, and what CAM reads."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        bound = (in_features // members) ** -0.5  # nn.Linear's initialisation, per member
        self.member_weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    @property
    def weight(self) -> torch.Tensor:
        return self.member_weight / self.members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ClassMapHead(nn.Module):
    """The linear head applied at every position of the feature map (each class's CAM, bias
    included), each class's map then pooled by log-sum-exp with its own learnt sharpness r:
    (1/r) log mean exp(r s). r -> 0 is the mean (average pooling with a linear head, exactly),
    r -> inf the max. Averaged, a lesion of a few cells counts for a few 196ths of a 14x14 map;
    sharper, the cells that hold it carry the score, and the CAM is exactly the map the score is
    pooled from. Classes in `mean_pooled` (`normal`: the absence of disease anywhere on the film,
    which one quiet cell must not decide) keep the mean.

    With K members (an ensemble in one network), member k's class maps are its block of
    `member_weight` on its own channels (at a single model's scale, as `MemberHead`), each
    member has its own sharpness per class, and the logit is the mean of the members' (the
    bias is shared: it passes through the pooling unchanged). `weight`, what CAM reads, is the
    members' weights over K: their maps' mean. One member keeps `nn.Linear`'s `weight` name."""

    R_MIN, R_MAX = 1e-2, 50.0

    def __init__(self, in_features: int, out_features: int, members: int = 1, r0: float = CLASS_LSE_R0):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        bound = (in_features // members) ** -0.5  # nn.Linear's initialisation, per member
        weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        if members == 1:
            self.weight = weight
        else:
            self.member_weight = weight
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        shape = (out_features,) if members == 1 else (members, out_features)
        self.log_sharpness = nn.Parameter(torch.full(shape, math.log(r0)))
        self.register_buffer("mean_pooled", torch.zeros(out_features, dtype=torch.bool))

    def __getattr__(self, name: str):
        if name == "weight" and self.members > 1:
            return self.member_weight / self.members
        return super().__getattr__(name)

    def sharpness(self) -> torch.Tensor:
        """(classes,), or (K, classes) with members."""
        r = self.log_sharpness.clamp(math.log(self.R_MIN), math.log(self.R_MAX)).exp()
        return torch.where(self.mean_pooled, torch.full_like(r, self.R_MIN), r)

    def class_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, classes, h, w) class maps (logit units): one network's,
        or with members the mean of theirs."""
        return torch.einsum("bchw,kc->bkhw", maps, self.weight) + self.bias[:, None, None]

    def member_logits(self, maps: torch.Tensor) -> torch.Tensor:
        """(K, B, classes): each member's class maps, each pooled with its own sharpness."""
        parts = maps.unflatten(1, (self.members, -1))                          # B, K, C, h, w
        weight = self.member_weight.unflatten(1, (self.members, -1))          # n, K, C
        cams = torch.einsum("bkchw,nkc->kbnhw", parts, weight) + self.bias[:, None, None]
        return lse_pool(cams, self.sharpness()[:, None, :, None])

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, classes) logits."""
        if self.members > 1:
            return self.member_logits(maps).mean(0)
        return lse_pool(self.class_maps(maps), self.sharpness()[:, None])


def linear_head(members: int, in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features) if members == 1 else MemberHead(members, in_features, out_features)


class Classifier(nn.Module):
    """features [-> transition] -> global pooling -> dropout -> linear: multi-label logits.

    `forward_features(x)` gives the last feature maps (B, C, h, w) (after the transition layer,
    if any: the maps CAM weights apply to), `forward_head(maps)` the logits, `pool(maps)` the
    image embedding (B, C) that the annotator and the archive use (always the average: a search
    vector should not hinge on one position).
    """

    def __init__(self, backbone: str, num_classes: int, in_chans: int = 1, drop: float = 0.0,
                 pooling: str = "avg", lse_r: float = 10.0, transition: int = 0, members: int = 1):
        super().__init__()
        if backbone not in _FEATURES:
            raise CxrError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        if pooling not in POOLINGS:
            raise CxrError(f"unknown pooling {pooling!r}; choose {', '.join(POOLINGS)}")
        if members < 1:
            raise CxrError(f"members must be at least 1, got {members}")
        if members > 1 and transition:
            raise CxrError("a transition layer would mix the members' maps; use members 1 or transition 0")
        self.backbone, self.pooling, self.lse_r = backbone, pooling, float(lse_r)
        self.members = int(members)
        self.features = (_FEATURES[backbone](in_chans) if members == 1
                         else MemberFeatures(backbone, in_chans, members))
        self.num_features = self.features.num_features
        # ChestX-ray8's transition layer: a 3x3 conv to a uniform width before pooling
        self.transition = conv_bn(self.num_features, transition, 3) if transition else None
        if transition:
            self.num_features = transition
        self.drop = nn.Dropout(drop)
        self.head = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if self.pooling == "class_lse":
            return ClassMapHead(self.num_features, num_classes, self.members)
        return linear_head(self.members, self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        return self.transition(maps) if self.transition is not None else maps

    @staticmethod
    def pool(maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))

    def pool_for_head(self, maps: torch.Tensor) -> torch.Tensor:
        return lse_pool(maps, self.lse_r) if self.pooling == "lse" else self.pool(maps)

    def pool_as_mean(self, classes: list[int]) -> None:
        """With `class_lse`, these outputs keep the plain mean of their maps (see `ClassMapHead`)."""
        if self.pooling == "class_lse":
            self.head.mean_pooled[classes] = True

    def forward_head(self, maps: torch.Tensor) -> torch.Tensor:
        if self.pooling == "class_lse":
            return self.head(self.drop(maps))
        return self.head(self.drop(self.pool_for_head(maps)))

    def member_logits(self, maps: torch.Tensor) -> torch.Tensor:
        """(K, B, classes): each member's own logit (its block of `MemberHead.member_weight` on
        its channels, plus the bias); their mean is `forward_head(maps)`."""
        if self.pooling == "class_lse":
            return self.head.member_logits(self.drop(maps))
        parts = self.drop(self.pool_for_head(maps)).unflatten(1, (self.members, -1))  # B, K, C
        weight = self.head.member_weight.unflatten(1, (self.members, -1))               # n, K, C
        return torch.einsum("bkc,nkc->kbn", parts, weight) + self.head.bias

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def forward(self, x: torch.Tensor, members: bool = False) -> torch.Tensor:
        """Logits (B, classes); with `members`, each member's own (K, B, classes)."""
        maps = self.forward_features(x)
        return self.member_logits(maps) if members else self.forward_head(maps)

    def reset_head(self, num_classes: int, parents: list[int] | None = None) -> None:
        """A new head with `num_classes` outputs; with `parents`, output i starts as a copy of the
        old output parents[i] (the cascade's refined labels start where their disease was)."""
        old = self.head
        self.head = self._new_head(num_classes).to(old.bias.device)
        weight = "weight" if self.members == 1 else "member_weight"
        if parents is not None:
            with torch.no_grad():
                if self.pooling == "class_lse":
                    self.head.log_sharpness.copy_(old.log_sharpness[..., parents])
                    self.head.mean_pooled.copy_(old.mean_pooled[parents])
                getattr(self.head, weight).copy_(getattr(old, weight)[parents])
                self.head.bias.copy_(old.bias[parents])


def create_cnn(backbone: str, num_classes: int, in_chans: int = 1, drop: float = 0.0,
               pooling: str = "avg", lse_r: float = 10.0, transition: int = 0,
               batch_norm: bool = True, members: int = 1) -> Classifier:
    model = Classifier(backbone, num_classes, in_chans, drop, pooling, lse_r, transition, members)
    return model if batch_norm else without_batch_norm(model)


class ChannelAffine(nn.Module):
    """What is left of a batch norm without the normalisation: a learnt scale and shift per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def without_batch_norm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a `ChannelAffine` (Shin et al.'s without-batch-norm arm: same
    layers and parameters, no normalisation by batch statistics)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, ChannelAffine(child.num_features))
        else:
            without_batch_norm(child)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file (never unpickles objects), or
    a cxr run's folder: its weights, whose `cnn.` tensors `load_pretrained` picks out (how a
    phantom run pre-trains a real-film run)."""
    path = Path(path)
    if not path.exists():
        raise CxrError("pretrained weights not found", path)
    if path.is_dir():
        if not (path / "weights.safetensors").exists():
            raise CxrError("not a cxr run (no weights.safetensors) nor a weights file", path)
        path = path / "weights.safetensors"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the user's file
        # torch's own message advises weights_only=False, i.e. unpickling: never do that here.
        raise CxrError("cannot read weights: not a safetensors file nor a weights-only PyTorch "
                       f"state dict ({type(exc).__name__})", path) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CxrError("not a state dict", path)
    return state


def load_pretrained(model: Classifier, path: str | Path, head: bool = False) -> dict[str, list[str]]:
    """Load a user-given state dict into `model` (non-strict). The head is skipped unless `head`
    (its classes rarely match); tensors whose shapes differ are skipped too. Returns a report:
    {"loaded": [...], "missing": [...], "unexpected": [...], "mismatched": [...]}."""
    state = _best_key_mapping(read_state_dict(path), set(model.state_dict()))
    own = model.state_dict()
    usable, mismatched = {}, []
    for k, v in state.items():
        if not head and k.startswith("head."):
            continue
        if k in own and own[k].shape != v.shape:
            mismatched.append(k)
        elif k in own:
            usable[k] = v
    result = model.load_state_dict(usable, strict=False)
    missing = [k for k in result.missing_keys if head or not k.startswith("head.")]
    unexpected = [k for k in state if k not in own]
    if not usable:
        raise CxrError(f"no tensor matches a {model.backbone} network", path)
    return {"loaded": sorted(usable), "missing": missing, "unexpected": unexpected,
            "mismatched": mismatched}


def _best_key_mapping(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """Rename keys the way that matches most of `own`: wrappers' prefixes (module., model., cnn.,
    backbone.) removed; a bare MONAI DenseNet121 dict (features.*) moved under features.trunk."""
    candidates = [state]
    for prefix in ("module.", "model.", "cnn.", "backbone.", "module.model."):
        if any(k.startswith(prefix) for k in state):
            candidates.append({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()})
    for cand in list(candidates):
        candidates.append({("features.trunk." + k[len("features."):]) if k.startswith("features.") else k: v
                           for k, v in cand.items()})
    members = {k.split(".")[2] for k in own if k.startswith("features.trunks.")}
    for cand in list(candidates):  # one trunk's weights start every member of an ensemble
        candidates.append({**{k: v for k, v in cand.items() if not k.startswith("features.")},
                           **{f"features.trunks.{m}.{k[len('features.'):]}": v for m in members
                              for k, v in cand.items() if k.startswith("features.")}})
    return max(candidates, key=lambda c: len(own & set(c)))
