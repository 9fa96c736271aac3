"""dpfused's own recurrent layers.

``DPLSTM``, ``DPGRU`` and ``DPRNN`` have the arguments, parameter names and outputs of ``nn.LSTM``,
``nn.GRU`` and ``nn.RNN``; ``dpfused.fix`` (and so Opacus' ``ModuleValidator.fix``) swaps them in
and copies the weights, as does ``dp_equivalent(module)`` for one module. torch's own layers are
clipped as they are too (``dpfused.rules.recurrent`` runs them through the same recurrence), so the
swap is optional.
"""

from dpfused.layers.recurrent import DPGRU, DPLSTM, DPRNN, DPRNNBase, dp_equivalent

__all__ = ["DPLSTM", "DPGRU", "DPRNN", "DPRNNBase", "dp_equivalent"]
