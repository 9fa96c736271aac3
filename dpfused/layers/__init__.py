"""Layers dpfused provides in place of ``torch.nn`` layers it cannot clip as they are.

``DPLSTM``, ``DPGRU`` and ``DPRNN`` replace ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (same arguments,
parameter names and outputs); ``dpfused.ModuleValidator.fix`` swaps them in and copies the weights,
as does ``dp_equivalent(module)`` for one module.
"""

from dpfused.layers.recurrent import DPGRU, DPLSTM, DPRNN, DPRNNBase, dp_equivalent

__all__ = ["DPLSTM", "DPGRU", "DPRNN", "DPRNNBase", "dp_equivalent"]
