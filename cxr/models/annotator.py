"""The RNN annotator: writes the annotation sequence of one finding (`opacity lung base left mild`).

As in Shin et al. 2016 the recurrent state starts from the CNN image embedding (a linear
projection). Unlike the paper, which trained only on images with a single disease pattern, every
finding of every image is a training sequence, *conditioned on its disease*: the initial state is
``tanh(W_img · embedding + E_label[disease])``, so the same image yields a different sequence for
each detected disease (its own location, side and severity). At use time the Reader asks for one
sequence per detected disease. Teacher forcing in training; greedy or beam search in use.

Token ids: 0 = <pad>, 1 = <start>, 2 = <end>, 3 = <unk>, then the vocabulary's words.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD, START, END, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")


def gru_update(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The GRU's new state from its input gates `gi` (x W_ih + b_ih) and hidden gates `gh`
    (h W_hh + b_hh), each (B, 3H) in nn.GRU's r, z, n order, as nn.GRU and nn.GRUCell compute it."""
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


def weights_version(*tensors: torch.Tensor) -> tuple:
    """Changes whenever any of the tensors is replaced or changed in place: the key of a table
    made from weights (an optimiser step or `load_state_dict` makes it stale)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


class Annotator(nn.Module):
    #: the GRU step under ONNX Runtime (`cxr.models.annotator_onnx`), set by the Reader on a CPU;
    #: `greedy` uses it only while it matches the weights (None: PyTorch)
    decoding = None

    def __init__(self, vocab_size: int, num_labels: int, image_dim: int, hidden: int = 256,
                 embed_dim: int = 128, cell: str = "gru", dropout: float = 0.1):
        super().__init__()
        if cell not in ("gru", "lstm"):
            from ..errors import CxrError
            raise CxrError(f"unknown rnn {cell!r}; choose gru or lstm")
        self.cell, self.hidden, self.vocab_size = cell, hidden, vocab_size
        self.word = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.label = nn.Embedding(num_labels, hidden)
        self.init_h = nn.Linear(image_dim, hidden)
        self.init_c = nn.Linear(image_dim, hidden) if cell == "lstm" else None
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(embed_dim, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)

    def init_state(self, embedding: torch.Tensor, labels: torch.Tensor):
        h = torch.tanh(self.init_h(embedding) + self.label(labels)).unsqueeze(0)
        if self.cell == "lstm":
            return h, torch.tanh(self.init_c(embedding)).unsqueeze(0)
        return h

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor):
        """Teacher forcing. `tokens` (B, T) = <start> w1 .. wn <end> <pad>...; returns logits for
        positions 1..T-1 (B, T-1, V) and the hidden states (B, T-1, H)."""
        states, _ = self.rnn(self.drop(self.word(tokens[:, :-1])), self.init_state(embedding, labels))
        return self.out(self.drop(states)), states

    def loss(self, embedding, labels, tokens) -> torch.Tensor:
        logits, _ = self(embedding, labels, tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                               ignore_index=PAD)

    @torch.no_grad()
    def context(self, embedding, labels, tokens) -> torch.Tensor:
        """The joint image/text context of the cascade: the mean of the hidden states over the
        annotation (the steps that read <start> and the words, i.e. up to the one emitting <end>)."""
        _, states = self(embedding, labels, tokens)
        mask = (tokens[:, 1:] != PAD).float().unsqueeze(-1)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _step(self, words: torch.Tensor, state):
        if self.cell == "gru" and not self.training:
            h = self._gru_step(words, state[0])
            return F.log_softmax(self.out(h), -1), h[None]
        out, state = self.rnn(self.word(words).unsqueeze(1), state)
        return F.log_softmax(self.out(out[:, 0]), -1), state

    def _gru_step(self, words: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One GRU step as `nn.GRU` computes it, with the input side looked up: every word's
        input gates (embedding x W_ih + b_ih) are one table made once per set of weights, so a
        step reads only W_hh (two thirds of the weights; the step was most of the Reader's time
        after the CNN at batch 1)."""
        gh = F.linear(h, self.rnn.weight_hh_l0, self.rnn.bias_hh_l0)
        return gru_update(self._input_gates()[words], gh, h)

    def _input_gates(self) -> torch.Tensor:
        w = (self.word.weight, self.rnn.weight_ih_l0, self.rnn.bias_ih_l0)
        key = weights_version(*w)
        if getattr(self, "_gates_key", None) != key:
            with torch.no_grad():
                self._gates = F.linear(w[0], w[1], w[2])
            self._gates_key = key
        return self._gates

    @torch.no_grad()
    def greedy(self, embedding, labels, max_len: int = 6) -> list[list[int]]:
        """Greedy decoding. The words a row may not write next (pad, start, a word it already
        wrote: a MeSH term never repeats a part; <end> at the first step) are one additive bar
        per row, updated in place (at batch 1 the Reader's time after the CNN is mostly these
        steps, and a mask rebuilt each step cost a third of a step); a finished row's later
        words are barred too, and dropped anyway. With `decoding` set (the Reader, on a CPU) each
        step runs as its ONNX Runtime graph."""
        if self.decoding is not None and not self.training and self.decoding.current(self):
            return self.decoding.greedy(embedding, labels, max_len)
        n, device = embedding.shape[0], embedding.device
        state = self.init_state(embedding, labels)
        bar = torch.zeros(n, self.vocab_size, device=device)
        bar[:, [PAD, START, END]] = -float("inf")
        words = torch.full((n,), START, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        steps, kept = [], []
        for step in range(max_len):
            logp, state = self._step(words, state)
            words = (logp + bar).argmax(-1)
            bar.scatter_(1, words[:, None], -float("inf"))
            if step == 0:  # an annotation has at least one word; then it may end
                bar[:, END] = 0.0
            keep = ~done & (words != END)
            steps.append(words)
            kept.append(keep)
            done |= ~keep
            if done.all():
                break
        if not steps:
            return [[] for _ in range(n)]
        words_at, kept_at = torch.stack(steps, 1).tolist(), torch.stack(kept, 1).tolist()
        return [[w for w, k in zip(ws, ks) if k] for ws, ks in zip(words_at, kept_at)]

    @torch.no_grad()
    def beam(self, embedding, labels, beams: int = 3, max_len: int = 6) -> list[list[int]]:
        """Beam search, one image-finding at a time (sequences are short: <= 6 steps)."""
        results = []
        for i in range(embedding.shape[0]):
            results.append(self._beam_one(embedding[i:i + 1], labels[i:i + 1], beams, max_len))
        return results

    def _beam_one(self, embedding, label, beams: int, max_len: int) -> list[int]:
        state = self.init_state(embedding, label)
        live = [(0.0, [], state)]  # (log prob, words, state)
        finished: list[tuple[float, list[int]]] = []
        for step in range(max_len):
            words = torch.tensor([b[1][-1] if b[1] else START for b in live], device=embedding.device)
            if self.cell == "lstm":
                st = (torch.cat([b[2][0] for b in live], 1), torch.cat([b[2][1] for b in live], 1))
            else:
                st = torch.cat([b[2] for b in live], 1)
            logp, st = self._step(words, st)
            logp[:, PAD] = logp[:, START] = -float("inf")
            if step == 0:
                logp[:, END] = -float("inf")
            for j, (_, seq, _) in enumerate(live):  # a MeSH term never repeats a part
                if seq:
                    logp[j, seq] = -float("inf")
            cands = []
            top = logp.topk(min(beams, logp.shape[1]), -1)
            for j, (score, seq, _) in enumerate(live):
                for lp, w in zip(top.values[j].tolist(), top.indices[j].tolist()):
                    sj = (st[0][:, j:j + 1], st[1][:, j:j + 1]) if self.cell == "lstm" else st[:, j:j + 1]
                    cands.append((score + lp, seq + [w], sj))
            cands.sort(key=lambda c: c[0], reverse=True)
            live = []
            for c in cands:
                if c[1][-1] == END:
                    finished.append((c[0] / len(c[1]), c[1][:-1]))
                elif len(live) < beams:
                    live.append(c)
                if len(live) >= beams and len(finished) >= beams:
                    break
            if not live:
                break
        finished += [(c[0] / max(len(c[1]), 1), c[1]) for c in live]
        return max(finished, key=lambda f: f[0])[1]


def encode(tokens: list[str], index: dict[str, int], max_len: int = 5) -> list[int]:
    """<start> w1..wn <end> with unknown words mapped to <unk>."""
    return [START] + [index.get(t, UNK) for t in tokens[:max_len]] + [END]


def pad_batch(seqs: list[list[int]]) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [PAD] * (width - len(s)) for s in seqs], dtype=torch.long)


def decode(ids: list[int], words: list[str]) -> list[str]:
    return [words[i] for i in ids if i >= len(SPECIALS) and i < len(words)]
