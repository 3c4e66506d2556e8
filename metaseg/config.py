"""Structured configs: the schema every YAML under ``conf/`` is merged into.

Registered with Hydra's ConfigStore and named first in each primary config's defaults list,
so a misspelt key (``meta.inner_lrr=0.1``) or a wrong type (``meta.inner_steps=two``) stops
the run while the config is composed, before any data is generated, with Hydra naming the
key. Field comments are the hyper-parameter table: alpha, beta, K and friends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DatasetConfig:
    """One dataset of a mix."""

    source: str = "synthetic"  # synthetic (generated, no files)
    domain: int = 0  # synthetic: which appearance domain
    num_images: int = 200  # synthetic: how many images to generate
    weight: float = 1.0  # sampling weight among the meta-training datasets


@dataclass
class DataConfig:
    """A dataset mix: who is meta-trained on, who is held out, in which label space."""

    name: str = MISSING
    classes: List[str] = MISSING  # the shared label space; index = class id
    size: int = 64  # images are square, size x size pixels
    mean: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: List[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    datasets: Dict[str, DatasetConfig] = field(default_factory=dict)
    train: List[str] = MISSING  # meta-training datasets (keys of `datasets`)
    heldout: List[str] = field(default_factory=list)  # evaluated, never meta-trained on
    seed: int = 0  # generator seed of synthetic sources (independent of the run's seed)


@dataclass
class ModelConfig:
    """An smp model; nothing is downloaded."""

    arch: str = "Unet"  # smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...
    encoder: str = "resnet18"  # smp encoder name
    encoder_weights: Optional[str] = None  # null (random init) or a local state-dict file
    in_channels: int = 3
    norm: str = "batch"  # batch (batch statistics, MAML style) | group
    extra: Dict[str, Any] = field(default_factory=dict)  # passed to smp.create_model


@dataclass
class MetaConfig:
    """The meta-learning algorithm and its hyper-parameters."""

    algorithm: str = "maml"
    inner_lr: float = 0.1  # alpha: inner-loop SGD step size
    outer_lr: float = 1e-3  # beta: outer-loop Adam step size
    inner_steps: int = 3  # K: inner SGD steps per task
    meta_batch: int = 2  # tasks per outer step
    shots: int = 4  # support images per task
    query: int = 4  # query images per task
    first_order: bool = False  # true: FOMAML (no gradient through the inner loop)
    # The algorithm zoo (README "Algorithms"); defaults leave plain MAML unchanged.
    inner_params: List[str] = field(default_factory=list)  # module patterns adapted in the inner loop (ANIL); []: all
    learn_inner_lr: bool = False  # Meta-SGD / MAML++: meta-learn the inner step sizes, starting at alpha
    inner_lr_granularity: str = "tensor"  # learned step sizes: one per parameter tensor | element
    inner_lr_per_step: bool = False  # MAML++: separate learned step sizes for each inner step
    multi_step_loss: bool = False  # MAML++: query loss after every inner step, weights annealed to the last
    msl_anneal_steps: int = 100  # MAML++: outer steps until only the last inner step's query loss counts
    first_order_until: int = 0  # MAML++: first order for the first N outer steps, then second order
    outer_lr_schedule: str = "constant"  # constant | cosine (MAML++: cosine annealing of beta)
    outer_lr_min: float = 0.0  # cosine: beta at the last step
    clip_grad: Optional[float] = None  # max L2 norm of the outer gradient; null: no clipping
    query_from: str = "same"  # same | other: query batch from the task's dataset or another of the mix
    gamma: float = 1.0  # MLDG: weight of the cross-dataset loss L_j(theta')
    second_order_fallback: bool = False  # encoder without second derivatives: true trains first order, warning


@dataclass
class TrainerConfig:
    """How long, where and in which precision to train, and how often to report."""

    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    precision: str = "32"  # 32 | bf16 | 16
    max_steps: int = 200  # outer steps
    eval_every: int = 100  # outer steps between held-out evaluations (0: only at the end)
    ckpt_every: int = 100  # outer steps between checkpoints (the last step always saves)
    log_every: int = 10  # outer steps between tensorboard and log lines
    threads: Optional[int] = None  # torch CPU threads; null leaves torch's default


@dataclass
class EvalConfig:
    """The held-out protocol: zero-shot, then few-shot adaptation, scored on the rest."""

    shots: int = 5  # labelled images of the held-out dataset to adapt on
    episodes: int = 5  # support sets drawn per dataset; scores are mean and 95% CI over them
    adapt_steps: Optional[int] = None  # inner steps when adapting; null: meta.inner_steps
    adapt_lr: Optional[float] = None  # inner step size when adapting; null: meta.inner_lr
    batch_size: int = 16  # images scored per forward pass (BatchNorm normalises per batch)
    max_images: Optional[int] = None  # cap on images scored per dataset; null: all the rest


@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    meta: MetaConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0


@dataclass
class EvalRunConfig:
    checkpoint: str = MISSING  # path of a metaseg checkpoint (.pt)
    data: Optional[DataConfig] = None  # null: the checkpoint's own mix and held-out datasets
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    precision: str = "32"
    seed: int = 0


def register_configs() -> None:
    """Register the schemas; YAML files name them in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="meta", name="schema", node=MetaConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)


register_configs()
