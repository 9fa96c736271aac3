"""Opacus compatibility: Opacus code runs on dpfused with one import changed.

    from opacus import PrivacyEngine          ->   from dpfused.opacus import PrivacyEngine

Opacus' module paths map to the submodules of the same names here:

    opacus.privacy_engine                      dpfused.opacus.privacy_engine (PrivacyEngine)
    opacus.accountants (RDPAccountant, ...)    dpfused.opacus.accountants, .accountants.utils
                                               (get_noise_multiplier), .accountants.registry
    opacus.schedulers (StepNoise, ...)         dpfused.opacus.schedulers
    opacus.utils.batch_memory_manager          dpfused.opacus.utils.batch_memory_manager
    opacus.utils.fsdp_utils (FSDP2Wrapper)     dpfused.opacus.utils.fsdp_utils
    opacus.validators (ModuleValidator)        dpfused.opacus.validators

Everything here is Opacus' interface over dpfused's own, which needs none of it:
``dpfused.PrivacyEngine`` (typed keywords, three return values, ``max_physical_batch_size=`` in
place of ``BatchMemoryManager``), ``dpfused.fix`` and ``dpfused.validate`` in place of
``ModuleValidator``, ``dpfused.accounting`` (the engine's own ledger, and
``calibrate_noise_multiplier`` for the sampling the engine performs) in place of the standalone
accountants. ``import dpfused`` does not import this package.
"""

from dpfused.opacus.accountants.utils import get_noise_multiplier
from dpfused.opacus.privacy_engine import GradSampleHooks, PrivacyEngine
from dpfused.opacus.utils.batch_memory_manager import BatchMemoryManager
from dpfused.opacus.utils.fsdp_utils import FSDP2Wrapper
from dpfused.opacus.validators import ModuleValidator

__all__ = ["BatchMemoryManager", "FSDP2Wrapper", "GradSampleHooks", "ModuleValidator",
           "PrivacyEngine", "get_noise_multiplier"]
