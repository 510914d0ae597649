"""Deep Support Vectors (DeepKKT): a pure PyTorch library.

Public API (explicit re-exports); the pipeline (``tasks``/``flows``) is built on these alone. A notebook
walk-through is ``examples/python_api.py`` (README, "Python API").
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from dsv.augment import AugmentConfig, augment, parse_augment
from dsv.certificate import ConvergeConfig, converge
from dsv.data.core import ImageDataset, denormalize, normalize
from dsv.data.registry import DataConfig, load_dataset
from dsv.extract import DSVResult, ExtractConfig, Shard, extract, extract_shard, init_candidates
from dsv.generate import (
    GenerateConfig,
    Generated,
    edit_images,
    generate_images,
    interpolate,
    sample,
    soft_targets,
)
from dsv.judge import JudgeScore, frechet_distance, judge_score, matched_real
from dsv.kernel import frozen, kkt_certificate
from dsv.kkt import KKTConfig, kkt_objective, primal_loss, stationarity_loss, stationarity_residual
from dsv.lam import LambdaConfig, LambdaResult, class_lambda_sums, fit_lambdas, pearson
from dsv.models import ModelConfig, build_model, build_seeded, final_linear, load_checkpoint, read_checkpoint
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
    "GenerateConfig",
    "Generated",
    "ImageDataset",
    "JudgeScore",
    "KKTConfig",
    "LambdaConfig",
    "LambdaResult",
    "ModelConfig",
    "Shard",
    "augment",
    "build_model",
    "build_seeded",
    "class_lambda_sums",
    "converge",
    "denormalize",
    "edit_images",
    "evaluate",
    "extract",
    "extract_shard",
    "final_linear",
    "fit",
    "fit_lambdas",
    "frechet_distance",
    "frozen",
    "generate_images",
    "init_candidates",
    "interpolate",
    "judge_score",
    "kkt_certificate",
    "kkt_objective",
    "load_checkpoint",
    "load_dataset",
    "matched_real",
    "normalize",
    "parse_augment",
    "pearson",
    "primal_loss",
    "read_checkpoint",
    "sample",
    "soft_targets",
    "stationarity_loss",
    "stationarity_residual",
]
