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
    """One dataset of a mix: where its files are, what its mask values mean, how they map."""

    source: str = "synthetic"  # synthetic (generated) | folder | voc | cityscapes | fss
    domain: int = 0  # synthetic: which appearance domain
    num_images: int = 200  # synthetic: how many images to generate
    weight: float = 1.0  # sampling weight among the meta-training datasets
    # on-disk sources (metaseg/data/folder.py, voc.py, cityscapes.py, fss.py)
    root: Optional[str] = None  # relative to data.root; null: the dataset's name
    classes: Optional[List[str]] = None  # the dataset's own classes (index = id); null: data.classes
    binary: Optional[bool] = None  # masks are 0/255 (255 -> class 1); null: true for 2 classes, no mask_values
    mask_values: Any = None  # {int: int}: raw mask value -> dataset class id (255: ignore)
    ignore_values: List[int] = field(default_factory=list)  # raw mask values that mean void
    threshold: Optional[int] = None  # binary masks: grey value >= threshold is foreground (JPEG masks)
    map: Any = None  # {dataset class: mix class}, each a name or id; mix class may be ignore
    split: Optional[List[str]] = None  # splits.csv / ImageSets / gtFine splits to keep; null: all
    groups: Any = None  # {column: [values]}: groups.csv column -> values to keep
    folders: Optional[List[str]] = None  # fss: class folders; cityscapes: cities; null: all
    mask_suffix: str = ""  # folder: masks/<stem><suffix>.png
    max_images: Optional[int] = None  # keep this many, evenly spaced over the sorted stems
    scale: float = 1.0  # data.patches: resample this dataset's images by this factor first (1: original pixels)


@dataclass
class AugmentConfig:
    """Joint image/mask augmentation of the meta-training datasets (held-out ones: resize only)."""

    enabled: bool = False
    scale: List[float] = field(default_factory=lambda: [0.5, 1.0])  # random-resized-crop area range
    ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333])  # crop aspect-ratio range
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip
    jitter: float = 0.0  # colour jitter strength (brightness, contrast, saturation)
    # differences between imaging sites (camera, colour, contrast, resolution, blur), image only
    # except zoom; all off by default, and an option that is off draws no random numbers
    zoom: Optional[List[float]] = None  # data.patches: cut size/z, z log-uniform in [lo, hi] (>1 magnifies)
    gamma: Optional[List[float]] = None  # image ** g, g log-uniform in [lo, hi]
    blur: float = 0.0  # probability of a Gaussian blur
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])  # blur sigma range in pixels (uniform)
    hue: float = 0.0  # hue shift uniform in [-hue, hue], at most 0.5
    grayscale: float = 0.0  # probability the image turns grey (3 channels kept)
    noise: float = 0.0  # additive Gaussian noise, std uniform in [0, noise] on the [0, 1] image


DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25  # data.mean/std null and no named encoder weights: every channel


@dataclass
class DataConfig:
    """A dataset mix: who is meta-trained on, who is held out, in which label space."""

    name: str = MISSING
    classes: Optional[List[str]] = None  # the shared label space; index = class id
    num_classes: Optional[int] = None  # instead of classes: N generic ones (background, class_1, ...)
    size: int = 64  # images are square, size x size pixels (0 in data=folder: the checkpoint's)
    # per-channel normalisation of [0, 1] images; null: the named encoder weights' own (smp's
    # preprocessing parameters, e.g. ImageNet's), else DEFAULT_MEAN/DEFAULT_STD. Set, it always wins.
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    datasets: Dict[str, DatasetConfig] = field(default_factory=dict)
    train: Optional[List[str]] = None  # meta-training datasets (keys of `datasets`); null: all not held out
    heldout: List[str] = field(default_factory=list)  # evaluated, never meta-trained on
    seed: int = 0  # generator seed of synthetic sources and augmentation (independent of the run's seed)
    root: Optional[str] = None  # directory the datasets' roots are relative to
    task: str = "semantic"  # semantic | binary_class (one class against the rest per task)
    binary_classes: Optional[List[str]] = None  # binary_class: classes that become tasks; null: all but background
    max_images: Optional[int] = None  # cap on images per dataset (quick runs); null: all
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: str = "memory"  # memory | disk: decoded, resized images kept in memory (and on disk)
    cache_dir: Optional[str] = None  # disk cache folder (cache: disk); null: .cache/metaseg
    workers: Optional[int] = None  # decoding threads; null: min(8, CPU count)
    # meta-validation split of every training dataset (metaseg/data/splits.py): best.pt, patience, eval.tune
    val_fraction: float = 0.2  # seeded fraction of each training dataset reserved for validation tasks
    val_splits: List[str] = field(default_factory=lambda: ["val"])  # splits.csv values reserved instead
    # true: samples are size x size patches cut from the images at their working scale
    # (data.datasets.NAME.scale x original), not whole images shrunk to size x size: thin
    # structures (vessels, membranes) keep their pixels. Score with eval.mode=slide.
    patches: bool = False
    # data.patches: share of training crops and support patches placed to contain a foreground
    # pixel (nnU-Net's foreground oversampling), the rest uniformly; 0: all uniform
    fg_patches: float = 0.0


@dataclass
class ModelConfig:
    """An smp model; named encoder weights come through smp's own download and cache (docs/models.md)."""

    arch: str = "Unet"  # smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...
    encoder: str = "resnet18"  # smp encoder name
    encoder_weights: Optional[str] = None  # null (random init), a name smp knows (imagenet, ...) or a local state dict
    strict_weights: bool = True  # a local weights file must fit the encoder; false: load what fits, log the rest
    in_channels: int = 3
    norm: str = "batch"  # batch (batch statistics, MAML style) | group
    smooth: bool = False  # true: ReLU -> SiLU, max -> average pooling: twice differentiable (second-order MAML)
    extra: Dict[str, Any] = field(default_factory=dict)  # passed to smp.create_model


@dataclass
class MetaConfig:
    """The meta-learning algorithm and its hyper-parameters."""

    algorithm: str = "maml"
    backend: str = "higher"  # inner loop on higher (default) | func (torch.func.functional_call)
    checkpoint_inner: bool = False  # second order: recompute each inner step in the outer backward (less memory)
    inner_lr: float = 0.1  # alpha: inner-loop SGD step size
    outer_lr: float = 1e-3  # beta: outer-loop Adam step size
    inner_steps: int = 3  # K: inner SGD steps per task
    meta_batch: int = 2  # tasks per outer step
    shots: int = 4  # support images per task
    query: int = 4  # query images per task
    first_order: bool = False  # true: FOMAML (no gradient through the inner loop)
    loss: str = "ce"  # ce: pixel cross-entropy | ce_dice: plus soft Dice of the non-background classes (thin, rare structures)
    # The algorithm zoo (docs/algorithms.md); defaults leave plain MAML unchanged.
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
    init_from: Optional[str] = None  # start from a metaseg checkpoint or an encoder state dict (engine/training/init_from.py)
    # iMAML (meta=imaml): phi* = argmin L_support(phi) + lambda/2 ||phi - theta||^2 by K SGD steps at alpha,
    # meta-gradient ((1 + cg_damping) I + H/lambda)^{-1} grad L_query(phi*) by conjugate gradient
    imaml_lambda: float = 2.0  # iMAML: lambda, pull of phi towards theta (training and adaptation alike)
    cg_steps: int = 5  # iMAML: conjugate-gradient iterations (Hessian-vector products) per task
    cg_damping: float = 0.0  # iMAML: added to the identity; > 0 steadies CG where the support loss is not convex


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
    resume: Optional[str] = None  # null: fresh | auto: <run dir>/checkpoints/last.pt if any | PATH (.pt or run dir)
    resume_strict: bool = True  # refuse a checkpoint of another metaseg version or config (false: warn)
    # a fresh run into a folder that holds a run is refused; true: delete its outputs and start afresh
    overwrite: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms: same numbers on GPU too, slower
    deterministic_warn_only: bool = False  # warn (not stop) at an op without a deterministic kernel
    best_metric: str = "val.mean.adapted_miou"  # result key for best.pt and the objective; val.: validation tasks
    patience: Optional[int] = None  # early stopping: evaluations without a better best_metric; null: never
    best_mode: str = "max"  # max | min
    monitor_tasks: int = 1  # fixed tasks whose query loss after 0..K inner steps is logged (0: off)
    # always: every evaluation scores the held-out datasets too | final: only the last one does, so the
    # learning curve (eval_every) reads validation tasks alone and costs nothing on held-out images
    eval_heldout: str = "always"


@dataclass
class EvalConfig:
    """The held-out protocol: zero-shot, then few-shot adaptation, scored on the rest.

    ``baseline`` (default true): the final evaluation also scores the same model at a seeded
    random initialisation (``metaseg-eval checkpoint=none``'s model) on the same episodes with
    the same adaptation, recorded under ``"baseline"`` in ``eval.json`` / ``metrics.json`` and
    set beside the trained scores in the summary a run ends with and in ``eval.md``
    (``metaseg/engine/evaluation/baseline.py``). It costs one more held-out evaluation; false turns it off
    (experiments whose study has its own ``scratch`` arm do). Evaluations during training,
    validation tasks and ``checkpoint=none`` itself never run it.
    """

    # k labelled images to adapt on: an int (5) or a list ([1, 5, 10]; the first k also fills
    # the top-level "adapted" scores). Any: OmegaConf has no int-or-list type; checked in code.
    shots: Any = 5
    episodes: int = 10  # support sets drawn per k and dataset; scores are mean and 95% CI over them
    adapt_steps: Optional[int] = None  # inner steps when adapting; null: meta.inner_steps
    adapt_lr: Optional[float] = None  # inner step size when adapting; null: meta.inner_lr
    batch_size: int = 16  # images (slide: windows) scored per forward pass (BatchNorm normalises per batch)
    max_images: Optional[int] = None  # cap on images scored per dataset; null: all the rest
    mode: str = "resize"  # resize: score samples at the training size | slide: window over full resolution
    window: Optional[int] = None  # slide: square window side; null: the training size (the samples' size)
    stride: Optional[int] = None  # slide: window step; null: half the window
    pictures: int = 4  # images per held-out dataset in the PNG grid (and tensorboard); 0: none
    support_patches: int = 8  # data.patches: random patches cut from each support image to adapt on
    val_episodes: Optional[int] = None  # episodes per validation dataset (best.pt, tune); null: episodes
    # adaptation curve: held-out score after each of these step counts (0: none), for every k, on the
    # protocol's episodes; eval.json "curve", eval.md, curve.png. []: off
    curve_steps: List[int] = field(default_factory=list)
    curve_shots: Optional[List[int]] = None  # the k the curve follows; null: every k of eval.shots
    # eval.tune (metaseg/engine/evaluation/tune.py): adapt_lr x adapt_steps picked on validation tasks, then held out
    tune: bool = False
    tune_lrs: List[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    tune_steps: List[int] = field(default_factory=lambda: [3, 10])
    tune_episodes: Optional[int] = None  # episodes per validation dataset per grid point; null: val_episodes
    tune_metric: str = "miou"  # what tuning maximises: miou | mf1 | fg_dice | fg_iou (binary label spaces)
    tune_datasets: Optional[List[str]] = None  # validation datasets whose mean score tuning maximises; null: all
    # the final evaluation's random-init baseline (see the docstring): "baseline" in eval.json/metrics.json
    baseline: bool = True


@dataclass
class PretrainConfig:
    """A first stage before meta-training (engine/training/stages.py): the two-stage recipe in one run."""

    steps: int = 0  # outer steps of the first stage; 0: none
    algorithm: str = "erm"  # the first stage's algorithm (joint training by default)
    checkpoint: str = "best"  # best (on validation tasks) | last: what the second stage starts from


@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    meta: MetaConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    seed: int = 0


@dataclass
class EvalRunConfig:
    checkpoint: str = MISSING  # path of a metaseg checkpoint (.pt), or none: a random-init baseline
    data: Optional[DataConfig] = None  # null: the checkpoint's own mix and held-out datasets
    data_root: Optional[str] = None  # data null: the folder holding the checkpoint's datasets on this machine
    model: Optional[ModelConfig] = None  # checkpoint=none only: the model to initialise at random
    meta: Optional[MetaConfig] = None  # checkpoint=none only: adaptation defaults (inner_steps, inner_lr)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    precision: str = "32"
    seed: int = 0


@dataclass
class DataCmdConfig:
    """``metaseg-data``: validate a dataset or mix, print a summary, write a grid of samples."""

    data: DataConfig = MISSING
    samples: int = 4  # samples per dataset in the overlay grid
    grid: str = "samples.png"  # the grid's file name, in the run folder
    task_images: Optional[int] = None  # also check every dataset holds this many images (shots + query)


@dataclass
class AdaptConfig:
    """``metaseg-predict``: how the model adapts to the labelled support images."""

    steps: Optional[int] = None  # inner SGD steps on the support; null: the checkpoint's meta.inner_steps (K)
    lr: Optional[float] = None  # step size; null: the checkpoint's (alpha, or its learned step sizes); a number replaces them


@dataclass
class PredictConfig:
    """``metaseg-predict``: adapt to a labelled support folder, then segment every image of a folder."""

    checkpoint: str = MISSING  # a metaseg checkpoint (.pt), or none: the `model` group at random init (needs support)
    images: str = MISSING  # folder of images to segment (any size; not searched recursively)
    out: str = MISSING  # output folder: masks/, overlays/, predict.json, predict.log (and adapted model)
    support: Optional[str] = None  # labelled folder (images/ + masks/, as data=folder); null: zero-shot
    data: Optional[DataConfig] = None  # how the support is read (data=folder: value mapping, classes); support sets data.root
    model: Optional[ModelConfig] = None  # checkpoint=none only: the model to initialise at random
    meta: Optional[MetaConfig] = None  # checkpoint=none only: adaptation defaults (inner_steps, inner_lr)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    mode: str = "resize"  # resize: whole image at the training size, logits upsampled | slide: window over full resolution
    window: Optional[int] = None  # slide: square window side; null: the training size
    stride: Optional[int] = None  # slide: window step; null: half the window
    batch_size: int = 8  # images (slide: windows) per forward pass (BatchNorm normalises per batch)
    masks: str = "index"  # index: class ids (palette PNG) | support: the support masks' own values (binary: 0/255)
    overlays: bool = True  # also write overlays/<stem>.png: the image, coloured classes and a legend
    overlay_alpha: float = 0.5  # opacity of the class colours in the overlays
    save_adapted: bool = False  # write adapted.pt (metaseg) and adapted_smp/ (smp save_pretrained) to out
    workers: Optional[int] = None  # threads reading and writing images; null: min(8, CPU count)
    device: str = "auto"
    precision: str = "32"
    seed: int = 0


def register_configs() -> None:
    """Register the schemas; YAML files name them in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(name="data_cmd_schema", node=DataCmdConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="meta", name="schema", node=MetaConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)


register_configs()
