"""Shin et al.'s global annotator's greedy decoding with its GRU step as an ONNX Runtime graph, on a CPU.

Each word of the global annotator is the GRU's hidden product, its gates and the output layer:
in eager PyTorch, MKL's product of seven findings' states by the 512-wide W_hh took 2.29x ONNX
Runtime's MLAS on the AMD CPU measured here (`cxr.models.grounded_onnx`), and the gates and
output are a dozen small dispatches. So on a CPU, where ONNX Runtime is installed (`cxr[fast]`),
the Reader exports that step from the annotator's own weights when it first decodes and runs it;
the word's input gates come from the annotator's own table (`Annotator._input_gates`), the first
state from its own `init_state`, and the choice of each word (the same bars as
`Annotator.greedy`) is made in NumPy between the graph's calls. A finding whose annotation has
ended leaves the graph's batch (its words are kept either way, so the words are the same).

Only the GRU cell is exported (`cxr train`'s default); an LSTM annotator decodes in PyTorch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .annotator import END, PAD, START, gru_update
from .grounded_onnx import ExportedFrom, export_session, graphs_or_none


class _Step(nn.Module):
    """One word of the global annotator's GRU in eval mode (`Annotator._gru_step` with the input
    gates given), then its log-probabilities over the vocabulary (`Annotator._step`)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, gates, h):
        cell = self.rnn.rnn
        h = gru_update(gates, F.linear(h, cell.weight_hh_l0, cell.bias_hh_l0), h)
        return torch.log_softmax(self.rnn.out(h), -1), h


class GlobalOnnxDecoding(ExportedFrom):
    """The step graph of one Annotator's weights."""

    def __init__(self, rnn):
        super().__init__(rnn)
        self.rnn = rnn
        n, hidden = 2, rnn.hidden
        self.session = export_session(
            _Step(rnn), (torch.zeros(n, 3 * hidden), torch.zeros(n, hidden)), ["gates", "h"],
            ["logp", "state"], {"gates": {0: "n"}, "h": {0: "n"}, "logp": {0: "n"}, "state": {0: "n"}})
        with torch.no_grad():
            self.gates = rnn._input_gates().float().numpy().copy()  # every word's input gates

    def greedy(self, embedding: torch.Tensor, labels: torch.Tensor, max_len: int) -> list[list[int]]:
        """`Annotator.greedy` with the graph: the same first state, bars and greedy choice."""
        n = len(labels)
        with torch.no_grad():
            state = self.rnn.init_state(embedding, labels)[0].float().numpy()
        bar = np.zeros((n, self.rnn.vocab_size), dtype=np.float32)
        bar[:, [PAD, START, END]] = -np.inf
        words = np.full(n, START, dtype=np.int64)
        live = np.arange(n)
        out: list[list[int]] = [[] for _ in range(n)]
        for step in range(max_len):
            logp, state = self.session.run(None, {"gates": self.gates[words], "h": state})
            words = (logp + bar).argmax(-1)
            bar[np.arange(len(words)), words] = -np.inf
            if step == 0:  # an annotation has at least one word; then it may end
                bar[:, END] = 0.0
            writing = words != END
            for row, word in zip(live[writing], words[writing]):
                out[row].append(int(word))
            if not writing.all():  # ended findings leave the batch
                if not writing.any():
                    break
                live, words, bar, state = live[writing], words[writing], bar[writing], state[writing]
        return out


def global_onnx_decoding(rnn) -> GlobalOnnxDecoding | None:
    """The step graph of a GRU global annotator on the CPU; None where ONNX Runtime or the
    exporter is missing, or for an LSTM (the caller then decodes in PyTorch)."""
    return graphs_or_none(GlobalOnnxDecoding, rnn)
