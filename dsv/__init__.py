"""Deep Support Vectors (DeepKKT): a pure PyTorch library.

Public API (explicit re-exports); the pipeline (``tasks``/``flows``) is built on these alone.
"""

from dsv.augment import AugmentConfig, augment, dsa_config
from dsv.extract import DSVResult, ExtractConfig, edit, extract, generate, init_candidates, soft_targets
from dsv.kkt import KKTConfig, kkt_objective, primal_loss, stationarity_loss, stationarity_residual
from dsv.lam import LambdaConfig, LambdaResult, class_lambda_sums, fit_lambdas, pearson
from dsv.models import ModelConfig, build_model, build_seeded
from dsv.train import EvalResult, FitConfig, FitResult, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "AugmentConfig",
    "DSVResult",
    "EvalResult",
    "ExtractConfig",
    "FitConfig",
    "FitResult",
    "KKTConfig",
    "LambdaConfig",
    "LambdaResult",
    "ModelConfig",
    "augment",
    "build_model",
    "build_seeded",
    "class_lambda_sums",
    "dsa_config",
    "edit",
    "evaluate",
    "extract",
    "fit",
    "fit_lambdas",
    "generate",
    "init_candidates",
    "kkt_objective",
    "pearson",
    "primal_loss",
    "soft_targets",
    "stationarity_loss",
    "stationarity_residual",
]
