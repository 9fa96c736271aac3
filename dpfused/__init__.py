"""Differentially private training for PyTorch with per-example clipping fused into backward."""

from dpfused.accounting import PrivacyBudgetExhausted, PrivacyReport
from dpfused.adaptive import AdaptiveClipping
from dpfused.batch_memory import BatchMemoryManager
from dpfused.engine import PrivacyEngine
from dpfused.opacus import get_noise_multiplier
from dpfused.instrument import detach, explain
from dpfused.losses import per_example_lm_loss
from dpfused.optimizer import DPOptimizer
from dpfused.validate import ModuleValidator, fix

__all__ = [
    "PrivacyEngine", "DPOptimizer", "AdaptiveClipping", "BatchMemoryManager", "ModuleValidator",
    "PrivacyBudgetExhausted", "PrivacyReport", "detach", "explain", "fix", "get_noise_multiplier",
    "per_example_lm_loss",
]
__version__ = "0.1.0"
