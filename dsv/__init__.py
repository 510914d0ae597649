"""Deep Support Vectors (DeepKKT): a pure PyTorch library.

Public API (explicit re-exports); the pipeline (``tasks``/``flows``) is built on these alone. A notebook
walk-through is ``examples/python_api.py`` (README, "Python API").
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from dsv.augment import AugmentConfig, augment, dsa_config
from dsv.certificate import ConvergeConfig, converge, final_linear, kkt_certificate
from dsv.data.core import ImageDataset, denormalize, normalize
from dsv.data.registry import DataConfig, load_dataset
from dsv.extract import DSVResult, ExtractConfig, edit, extract, generate, init_candidates, soft_targets
from dsv.kkt import KKTConfig, kkt_objective, primal_loss, stationarity_loss, stationarity_residual
from dsv.lam import LambdaConfig, LambdaResult, class_lambda_sums, fit_lambdas, pearson
from dsv.models import ModelConfig, build_model, build_seeded, load_checkpoint, read_checkpoint
from dsv.train import EvalResult, FitConfig, FitResult, evaluate, fit

try:
    __version__ = _version("deep-support-vectors")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AugmentConfig",
    "ConvergeConfig",
    "DSVResult",
    "DataConfig",
    "EvalResult",
    "ExtractConfig",
    "FitConfig",
    "FitResult",
    "ImageDataset",
    "KKTConfig",
    "LambdaConfig",
    "LambdaResult",
    "ModelConfig",
    "augment",
    "build_model",
    "build_seeded",
    "class_lambda_sums",
    "converge",
    "denormalize",
    "dsa_config",
    "edit",
    "evaluate",
    "extract",
    "final_linear",
    "fit",
    "fit_lambdas",
    "generate",
    "init_candidates",
    "kkt_certificate",
    "kkt_objective",
    "load_checkpoint",
    "load_dataset",
    "normalize",
    "pearson",
    "primal_loss",
    "read_checkpoint",
    "soft_targets",
    "stationarity_loss",
    "stationarity_residual",
]
