"""PEFT LoRA training of a new Nova adapter.

How the pieces fit:
- the model is loaded as usual (`nova.loading.load_model`); its resident task adapters stay untouched.
- `peft.get_peft_model` wraps the chosen `nn.Linear` modules of that model in place with a trainable LoRA
  (adapter "default"); every training row is routed to *no* resident adapter, so the forward is base
  weights + the LoRA being trained.
- the forward is the model's own `forward_hidden` on rows prepared by its own processor (same rendering,
  instructions, images and pooling masks as `encode`), pooled here with gradients (masked mean +
  L2-normalize; multi-vector: projector output on the non-instruction tokens, normalized per token).
- each contrastive batch's gradient comes from `contrastive.contrastive_backward` (GradCache over mini-batches,
  candidates gathered across the processes `torchrun` started, see `distributed`).
- the adapter is saved with `save_pretrained`: a standard PEFT folder (`adapter_config.json` +
  `adapter_model.safetensors`), which `model.load_adapter(name, path)` and the server's
  `/v1/internal/lora/load` read as is. At the end the PEFT layers are removed again (`unload()`), the saved
  folder is loaded through `load_adapter` and its vectors are checked against the training forward.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from nova.command import check_adapter_path, check_output_folder, clear_output, warn_random_weights
from nova.evaluation.errors import UserInputError
from nova.model_config import read_model_config
from nova.repo import is_base_model_name

from .contrastive import ContrastiveBatch, Embeddings, contrastive_backward
from .data import BatchOrder, Triplet, load_triplets
from .distributed import Processes
from .loss import Contrast
from .progress import LOG_FILE, StepRecord, TrainLog, memory_plan, peak_memory

_LLM = r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
_VISION = r"visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"
_MERGER = r"visual\.merger\.mlp\.\d+"
TARGET_PRESETS = {
    # the vision-language merger ("projector") that maps vision features into the language model
    "projector": _MERGER,
    # Jina V4's adapter targets: every language-model projection and the multi-vector projector
    "llm": rf"{_LLM}|multi_vector_projector",
    # everything linear: language model, vision tower, merger, multi-vector projector
    "all": rf"{_LLM}|multi_vector_projector|{_VISION}|{_MERGER}",
}
STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
# Settings a resumed run may change: where and how it runs and reports, not what it computes. Every other
# setting must be the checkpoint's (a new setting is compared unless it is listed here). The data is compared by
# its contents, not its path.
# The mini-batch and the precision change how the gradient is computed, not what it is.
RESUME_MAY_DIFFER = ("data", "out", "resume", "overwrite", "name", "checkpoint_every", "keep_checkpoints", "eval_dataset",
                     "eval_split", "eval_instructions", "device", "gradient_checkpointing", "progress", "log_every",
                     "mini_batch_size", "precision")
# What a run writes into --out (globs): what --overwrite deletes; a folder holding anything else is refused.
OUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", CHECKPOINTS, "eval",
             "nova_training.json", "losses.json", LOG_FILE)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str | None = None
    name: str | None = None
    targets: str = "llm"
    rank: int | None = None  # default 16, or the starting adapter's
    alpha: float | None = None  # default 2 x rank, or the starting adapter's
    dropout: float = 0.0
    init_adapter: str | None = None  # resident adapter name or PEFT folder
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "linear"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 16  # the contrastive batch: every candidate of it is a negative for every query
    mini_batch_size: int = 16  # triplets embedded with a graph at once (GradCache when smaller than the batch)
    grad_accum: int = 1
    temperature: float = 0.05
    false_negative_margin: float | None = None  # drop candidates scoring above a query's positive by more
    max_negatives: int | None = None
    query_task: str = "retrieval.query"
    passage_task: str = "retrieval.passage"
    vectors: str = "single"  # single | multi | both
    max_length: int | None = 512
    checkpoint_every: int = 0  # optimizer steps; 0 = only the final adapter
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # replace an earlier run's output in `out`
    seed: int = 0
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_instructions: str | None = None
    device: str | None = None
    precision: str | None = None  # fp32 | bf16 (autocast, fp32 LoRA masters); default: the model's dtype
    gradient_checkpointing: bool = False
    progress: bool | None = None
    log_every: int = 25

    def resolved_name(self) -> str:
        return self.name or Path(self.out).resolve().name


@dataclass
class TrainResult:
    out: Path
    name: str
    steps: int
    final_loss: float | None
    reload_max_abs_diff: float | None
    eval: dict | None = None
    losses: list[float] = field(default_factory=list)
    processes: int = 1
    is_main: bool = True  # False on the other processes of a torchrun group (they write nothing)


# ---- targets ---------------------------------------------------------------------------------------------

def _compact_regex(names: list[str], all_names: list[str]) -> str:
    """A readable regex matching exactly ``names``: layer indices generalized when that stays exact."""
    general = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names})
    pattern = "|".join(general)
    if {n for n in all_names if re.fullmatch(pattern, n)} == set(names):
        return pattern
    return "|".join(re.escape(n) for n in sorted(names))


def resolve_targets(model: nn.Module, targets: str) -> tuple[str, list[str]]:
    """Preset name or regex -> (regex PEFT will fullmatch against module names, matched Linear modules)."""
    pattern = TARGET_PRESETS.get(targets, targets)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UserInputError(f"--targets {targets!r}: not a preset ({', '.join(TARGET_PRESETS)}) nor a valid regex: {exc}") from None
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    matched = [n for n in linear if regex.fullmatch(n)]
    if not matched:
        raise UserInputError(
            f"--targets {targets!r} matches no Linear module of this model (regexes must match full module names, "
            f"e.g. {linear[0] if linear else 'model.layers.0.self_attn.q_proj'})"
        )
    other = [n for n, m in modules.items() if regex.fullmatch(n) and not isinstance(m, nn.Linear) and n]
    if other:  # PEFT would refuse non-Linear targets: narrow the pattern to the Linear ones
        pattern = _compact_regex(matched, list(modules))
    return pattern, matched


# ---- model pieces ----------------------------------------------------------------------------------------

def _inner(peft_model) -> nn.Module:
    return peft_model.base_model.model


def prepare_rows(model, items: list[dict], max_length: int | None, where: list[str]):
    rows = []
    for i, item in enumerate(items):
        try:
            rows.append(model.processor.prepare_item(item, index=i, max_length=max_length))
        except ValueError as exc:
            message = str(exc)
            if message.startswith(f"item {i}: "):
                message = message[len(f"item {i}: "):]
            raise UserInputError(f"{where[i]}: {message}") from None
    return rows


def embed_rows(model, rows, want_single: bool, want_multi: bool):
    """The model's own differentiable pooling over prepared rows, through the PEFT layers only (no resident
    adapter). Returns (pooled [N, H] or None, (tokens [N, T, 128], mask [N, T]) or None)."""
    pooled, tokens, mask = model.forward_rows(rows, pooled=want_single, multivector=want_multi,
                                              adapters=[None] * len(rows))
    return pooled, ((tokens, mask) if want_multi else None)


@dataclass
class RowEncoder:
    """Prepared rows -> their `Embeddings` through the LoRA being trained, with a graph when gradients are
    enabled. Rows are collated for training even without a graph (GradCache's first pass), so both passes
    run the very same computation."""

    model: nn.Module
    single: bool
    multi: bool
    autocast: torch.dtype | None = None

    def __call__(self, rows) -> Embeddings:
        collated = self.model.collate_rows(rows, [None] * len(rows), for_training=True)
        device_type = self.model.device.type
        cast = torch.autocast(device_type, dtype=self.autocast) if self.autocast else nullcontext()
        with cast:
            pooled, tokens, mask = self.model.forward_rows(rows, pooled=self.single, multivector=self.multi,
                                                           adapters=[None] * len(rows), collated=collated)
        return Embeddings(pooled, tokens, mask)


def _lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "~")) or os.sep in spec


def _init_weights(model, spec: str) -> tuple[dict, dict]:
    """Starting adapter -> (its config, {module: (A, B)}) from a resident adapter or a PEFT folder."""
    if spec in model.list_adapters():
        return model.adapter_state(spec)
    if _looks_like_path(spec):
        check_adapter_path("--init-adapter", spec)
    if not Path(spec).is_dir():
        known = ", ".join(model.list_adapters())
        raise UserInputError(f"--init-adapter {spec!r}: neither a loaded adapter ({known or 'none'}) nor a folder")
    # read and validate the folder through the model's own loader, take its weights, unload it again
    temp = "nova-train-init"
    try:
        model.load_adapter(temp, spec)
    except ValueError as exc:
        raise UserInputError(f"--init-adapter {spec}: {exc}") from None
    try:
        return _init_weights(model, temp)
    finally:
        model.unload_adapter(temp)


# ---- training --------------------------------------------------------------------------------------------

@dataclass
class AdapterPlan:
    """The LoRA to attach: where, how large, and the starting weights (None: a new adapter)."""

    pattern: str
    matched: list[str]
    rank: int
    alpha: float
    use_rslora: bool = False
    init_pairs: dict | None = None


@dataclass
class Checkpoint:
    """What a resumed run starts from, read by rank 0 and shared with the other processes (which may run on
    machines that cannot see the output folder)."""

    path: Path
    step: int
    losses: list[float]
    optimizer: dict
    scheduler: dict
    weights: dict[str, torch.Tensor]


@dataclass
class BatchReport:
    loss: float  # the whole batch's loss, times the weight it was trained with
    tokens: int  # tokens this process embedded
    reached_adapter: bool  # False: nothing depended on a trainable parameter (no gradient)
    negatives_per_query: float  # the negatives the loss kept per query (duplicates and margin drops excluded)
    triplets: int


def _step_seed(seed: int, batch_index: int, rank: int) -> int:
    """The random state a contrastive batch starts from (dropout): fixed by the seed, the batch and the process,
    so a resumed run draws what the uninterrupted one drew, without carrying generator states around."""
    return (seed * 1_000_003 + batch_index * 7_919 + rank * 104_729) % (2**63 - 1)


class Trainer:
    """`nova train` in named steps: `setup` (data, output folder, model, LoRA, optimizer, resume), `train_loop`
    (optimizer steps, each `accumulate_gradients` + `synchronize_gradients`), `finish` (save, reload check,
    held-out evaluation, summary; rank 0 only)."""

    def __init__(self, config: TrainConfig, log=print):
        self.cfg = config
        self.out = Path(config.out)
        self._log = log

    def log(self, message: str) -> None:
        if self.processes.is_main:
            self._log(message)

    # -- the run --
    def start(self) -> None:
        """Check the settings, choose the device, join the other processes (if torchrun started several)."""
        self._validate()
        self.device = self._resolve_device()
        self.processes = Processes.from_environment(self.device.type)

    def run(self) -> TrainResult:
        self.start()
        try:
            self.setup()
            self.train_loop()
            self.processes.barrier()  # every rank's last step is done before rank 0 writes and evaluates
            if not self.processes.is_main:
                return TrainResult(self.out, self.cfg.resolved_name(), self.step, None, None, None, self.losses,
                                   self.processes.world, is_main=False)
            return self.finish()
        finally:
            self.processes.close()

    def setup(self) -> None:
        cfg = self.cfg
        self.triplets = load_triplets(cfg.data, cfg.query_task, cfg.passage_task, cfg.max_negatives)
        if min(len(self.triplets), cfg.batch_size) < self.processes.world:
            raise UserInputError(f"a contrastive batch of {min(len(self.triplets), cfg.batch_size)} triplets cannot be "
                                 f"split across {self.processes.world} processes: raise --batch-size (or add "
                                 "data), or start fewer processes")
        self.data_sha256 = _file_sha256(cfg.data)
        checkpoint = self.processes.run_on_main(self._prepare_output)
        if self.processes.is_main:
            warn_random_weights("nova train", read_model_config(cfg.model).random_weights)
        self.model = self._load_model()
        self.log(f"{len(self.triplets)} training examples from {cfg.data}; model "
                 f"{cfg.model or 'tiny random-weight checkpoint'}"
                 + (f"; {self.processes.world} processes ({self.processes.backend})" if self.processes.active else ""))
        self.resident_before = {name: self.model.adapter_state(name)[1] for name in self.model.list_adapters()}
        self.plan = self._plan_adapter(self.model)
        self._attach_lora(self.plan)
        self._make_optimizer()
        self.step, self.losses, self.resumed_at = 0, [], None
        if checkpoint is not None:
            self._restore(checkpoint)
        want_single, want_multi = cfg.vectors in ("single", "both"), cfg.vectors in ("multi", "both")
        autocast = PRECISIONS["bf16"] if cfg.precision == "bf16" else None
        self.encoder = RowEncoder(self.inner, want_single, want_multi, autocast)

    # -- setup steps --
    def _validate(self) -> None:
        cfg = self.cfg
        if cfg.vectors not in ("single", "multi", "both"):
            raise UserInputError("--vectors must be single, multi or both")
        if cfg.schedule not in ("constant", "linear", "cosine"):
            raise UserInputError("--schedule must be constant, linear or cosine")
        if cfg.precision is not None and cfg.precision not in PRECISIONS:
            raise UserInputError(f"--precision must be one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "mini_batch_size", "grad_accum"):
            if getattr(cfg, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
        if cfg.steps is not None and cfg.steps < 1:
            raise UserInputError("--steps must be at least 1")
        if cfg.epochs <= 0:
            raise UserInputError("--epochs must be positive")
        if cfg.temperature <= 0:
            raise UserInputError("--temperature must be positive")
        if cfg.false_negative_margin is not None and cfg.false_negative_margin < 0:
            raise UserInputError("--false-negative-margin must not be negative")
        if cfg.lr <= 0:
            raise UserInputError("--lr must be positive")
        if cfg.rank is not None and cfg.rank < 1:
            raise UserInputError("--rank must be at least 1")
        if not 0 <= cfg.dropout < 1:
            raise UserInputError("--dropout must be in [0, 1)")
        if cfg.eval_dataset and not Path(cfg.eval_dataset).is_dir():
            raise UserInputError(f"--eval-dataset: folder not found: {cfg.eval_dataset}")

    def _resolve_device(self) -> torch.device:
        """--device, or CUDA when there is one; under torchrun each process takes the GPU of its local rank."""
        spec = self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(spec)
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return device

    def _prepare_output(self) -> Checkpoint | None:
        """Rank 0: check --out (and --resume's checkpoint against this run's settings) before anything is
        deleted, then clear what --overwrite replaces."""
        cfg = self.cfg
        resume_from = self._checkpoint_to_resume()
        entries = check_output_folder(self.out, prog="nova train", ours=OUT_FILES, overwrite=cfg.overwrite,
                                      resume=resume_from is not None, resumable=True)
        checkpoint = None
        if resume_from is not None:
            state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
            self._check_resume_settings(resume_from, state, self.data_sha256)
            from safetensors.torch import load_file

            checkpoint = Checkpoint(resume_from, int(state["step"]), list(state.get("losses", [])), state["optimizer"],
                                    state["scheduler"], load_file(str(resume_from / "adapter_model.safetensors")))
        clear_output(entries)
        self.out.mkdir(parents=True, exist_ok=True)
        return checkpoint

    def _check_resume_settings(self, checkpoint: Path, state: dict, data_sha256: str) -> None:
        """A resumed run must be the checkpoint's run: any setting that changes what is computed (steps, lr,
        batch size, targets, data, ...) is refused, each named with both values."""
        saved, now = state["config"], asdict(self.cfg)
        changed = [f"--{key.replace('_', '-')} (checkpoint {saved.get(key)!r}, now {now[key]!r})"
                   for key in now if key not in RESUME_MAY_DIFFER and saved.get(key) != now[key]]
        if state.get("data_sha256", data_sha256) != data_sha256:
            changed.append(f"--data (the contents of {self.cfg.data} changed since the checkpoint)")
        if changed:
            raise UserInputError(
                f"--resume {checkpoint}: settings differ from the checkpoint's: {', '.join(changed)}; resume with "
                "the checkpoint's settings, or start over with --overwrite"
            )

    def _checkpoint_to_resume(self) -> Path | None:
        spec = self.cfg.resume
        if not spec:
            return None
        if spec == "latest":
            found = sorted((self.out / CHECKPOINTS).glob("step-*"))
            found = [p for p in found if (p / STATE_FILE).is_file()]
            if not found:
                raise UserInputError(f"--resume: no checkpoint under {self.out / CHECKPOINTS}")
            return found[-1]
        path = Path(spec)
        if not path.is_dir():
            raise UserInputError(f"--resume {spec}: checkpoint folder not found")
        if not (path / STATE_FILE).is_file():
            raise UserInputError(f"--resume {spec}: not a checkpoint folder (no {STATE_FILE})")
        return path

    def _load_model(self):
        from nova.evaluation.pipeline import load_in_process

        dtype = PRECISIONS[self.cfg.precision] if self.cfg.precision else None
        return load_in_process(self.cfg.model, str(self.device), [], dtype=dtype)

    def _plan_adapter(self, model) -> AdapterPlan:
        cfg = self.cfg
        init_config, init_pairs = (None, None)
        if cfg.init_adapter and not is_base_model_name(cfg.init_adapter):
            init_config, init_pairs = _init_weights(model, cfg.init_adapter)
        if init_pairs is not None:
            rank = int(init_config.get("r") or next(iter(init_pairs.values()))[0].shape[0])
            alpha = float(init_config.get("lora_alpha", rank))
            if cfg.rank is not None and cfg.rank != rank:
                raise UserInputError(f"--rank {cfg.rank}: the starting adapter has rank {rank}")
            if cfg.alpha is not None and cfg.alpha != alpha:
                raise UserInputError(f"--alpha {cfg.alpha}: the starting adapter has alpha {alpha}")
            all_names = [n for n, _ in model.named_modules()]
            plan = AdapterPlan(_compact_regex(sorted(init_pairs), all_names), sorted(init_pairs), rank, alpha,
                               bool(init_config.get("use_rslora")), init_pairs)
        else:
            rank = cfg.rank or 16
            pattern, matched = resolve_targets(model, cfg.targets)
            plan = AdapterPlan(pattern, matched, rank, cfg.alpha if cfg.alpha is not None else 2.0 * rank)
        has_images = any("image" in item for t in self.triplets for item in (t.query, t.positive, *t.negatives))
        if plan.matched and all(name.startswith("visual.") for name in plan.matched) and not has_images:
            raise UserInputError(f"--targets {cfg.targets!r} only reaches the vision tower, but {cfg.data} has no "
                                 "images: nothing would train")
        if plan.rank > model.max_lora_rank:
            self.log(f"warning: rank {plan.rank} exceeds this model's max_lora_rank {model.max_lora_rank}; "
                     f"servers must be started with --max-lora-rank >= {plan.rank} to load it")
        return plan

    def _attach_lora(self, plan: AdapterPlan) -> None:
        """PEFT's LoRA around the planned modules; its parameters are fp32 (the masters, whatever the weights'
        dtype) and the same on every process."""
        from peft import LoraConfig, get_peft_model

        cfg, model = self.cfg, self.model
        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # pragma: no cover
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora_config = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=cfg.dropout,
                                 target_modules=plan.pattern, bias="none", use_rslora=plan.use_rslora,
                                 init_lora_weights=True)
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.peft_model = get_peft_model(model, lora_config)
        self.inner = _inner(self.peft_model)
        if plan.init_pairs is not None:
            with torch.no_grad():
                for module_name, (a, b) in plan.init_pairs.items():
                    layer = self.inner.get_submodule(module_name)
                    layer.lora_A["default"].weight.copy_(a)
                    layer.lora_B["default"].weight.copy_(b)
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        with torch.no_grad():
            for parameter in self.trainable:
                if parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()
                self.processes.broadcast_(parameter.data)
        self.n_params = sum(p.numel() for p in self.trainable)
        self.log(f"LoRA rank {plan.rank}, alpha {plan.alpha:g} on {len(plan.matched)} modules "
                 f"({self.n_params:,} trainable parameters); targets: {plan.pattern}")

    def _make_optimizer(self) -> None:
        cfg = self.cfg
        self.order = BatchOrder(len(self.triplets), cfg.batch_size, cfg.seed)
        self.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * self.order.per_epoch / cfg.grad_accum))
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.schedule, cfg.warmup_steps, self.total_steps))

    def _restore(self, checkpoint: Checkpoint) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft_model, checkpoint.weights)
        if getattr(result, "unexpected_keys", None):
            raise UserInputError(f"--resume {checkpoint.path}: adapter weights do not fit ({result.unexpected_keys[:2]})")
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.step, self.losses = checkpoint.step, list(checkpoint.losses)
        self.resumed_at = checkpoint.step
        self.log(f"resumed from {checkpoint.path} at step {self.step}/{self.total_steps}")

    # -- one optimizer step --
    def contrastive_batch(self, index: int) -> ContrastiveBatch:
        triplets = [self.triplets[i] for i in self.order.indices(index)]
        return ContrastiveBatch(triplets, self.processes.rank, self.processes.world)

    def accumulate_gradients(self, index: int, weight: float = 1.0) -> BatchReport:
        """Contrastive batch `index` -> its gradient (of its loss times `weight`) added to the trainable
        parameters' `.grad`, this process's part."""
        cfg = self.cfg
        batch = self.contrastive_batch(index)
        local = batch.local
        where = f"{cfg.data} line"
        query_rows = prepare_rows(self.inner, [t.query for t in local], cfg.max_length,
                                  [f"{where} {t.line}: query" for t in local])
        positive_rows = prepare_rows(self.inner, [t.positive for t in local], cfg.max_length,
                                     [f"{where} {t.line}: positive" for t in local])
        negative_rows = prepare_rows(self.inner, [n for t in local for n in t.negatives], cfg.max_length,
                                     [f"{where} {t.line}: negatives[{i}]" for t in local for i in range(len(t.negatives))])
        torch.manual_seed(_step_seed(cfg.seed, index, self.processes.rank))
        outcome = contrastive_backward(batch, query_rows, positive_rows, negative_rows, self.encoder,
                                       mini_batch_size=cfg.mini_batch_size,
                                       contrast=Contrast(cfg.temperature, cfg.false_negative_margin),
                                       processes=self.processes, device=self.inner.device, weight=weight)
        return BatchReport(outcome.loss, outcome.tokens, outcome.reached_adapter,
                           outcome.negatives_per_query, len(batch.triplets))

    def synchronize_gradients(self) -> None:
        """Each process holds its own part of the batch's gradient: the sum is the whole batch's."""
        if not self.processes.active:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.trainable])
        self.processes.sum_(flat)
        offset = 0
        for p in self.trainable:
            size = p.numel()
            p.grad = flat[offset:offset + size].view_as(p).clone()
            offset += size

    def train_loop(self) -> None:
        cfg = self.cfg
        self.peft_model.train()
        progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        progress = progress and self.processes.is_main
        from tqdm.auto import tqdm

        train_log = TrainLog(self.out, self.resumed_at) if self.processes.is_main else None
        self.log(memory_plan(self.model, self.trainable, self.processes.world))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", disable=not progress,
                   dynamic_ncols=True)
        self.started = time.perf_counter()
        self.recent: list[float] = []
        self.warned_no_grad = False
        self.peak_memory = None
        while self.step < self.total_steps:
            record = self.optimizer_step()
            if self.peak_memory is None:
                self.peak_memory = peak_memory(self.inner.device)
                self.log(f"memory after the first step: {self.peak_memory[0] / (1 << 30):.2f} GiB "
                         f"({self.peak_memory[1]})")
            if train_log is not None:
                train_log.write(record)
            bar.update(1)
            bar.set_postfix(record.postfix())
            if not progress and (self.step % max(1, cfg.log_every) == 0 or self.step == self.total_steps):
                self.log(record.text())
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                if self.processes.is_main:
                    self._save_checkpoint()
        bar.close()
        self.peft_model.eval()
        self.elapsed = time.perf_counter() - self.started

    def optimizer_step(self) -> StepRecord:
        """`--grad-accum` contrastive batches, their gradients summed over the processes, clipped, applied."""
        cfg = self.cfg
        step_started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, tokens, triplets, negatives = 0.0, 0, 0, 0.0
        for k in range(cfg.grad_accum):
            report = self.accumulate_gradients(self.step * cfg.grad_accum + k, 1.0 / cfg.grad_accum)
            if not report.reached_adapter and not self.warned_no_grad:  # e.g. projector-only, a batch without images
                self.log("note: a contrastive batch reached none of the adapter's target modules (no gradient); "
                         "it is skipped")
                self.warned_no_grad = True
            step_loss, tokens, triplets = step_loss + report.loss, tokens + report.tokens, triplets + report.triplets
            negatives += report.negatives_per_query * report.triplets  # the step's figure: over all its queries
        self.synchronize_gradients()
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.losses.append(step_loss)
        self.recent = (self.recent + [step_loss])[-20:]
        seconds = time.perf_counter() - step_started
        tokens = int(self.processes.sum_(torch.tensor([tokens], device=self.inner.device)).item())
        return StepRecord(self.step, self.total_steps, step_loss, sum(self.recent) / len(self.recent),
                          self.scheduler.get_last_lr()[0], triplets / seconds, tokens / seconds,
                          negatives / triplets, time.perf_counter() - self.started)

    # -- the end (rank 0) --
    def finish(self) -> TrainResult:
        cfg = self.cfg
        self.peft_model.save_pretrained(str(self.out))
        self.log(f"saved adapter to {self.out} (adapter_config.json + adapter_model.safetensors) after {self.step} "
                 f"steps, {self.elapsed:.0f}s")
        diff = self._check_reload()
        plan = self.plan
        summary = {
            "name": cfg.resolved_name(), "steps": self.step, "examples": len(self.triplets),
            "elapsed_seconds": round(self.elapsed, 1),
            "final_loss": self.losses[-1] if self.losses else None,
            "first_loss": self.losses[0] if self.losses else None,
            "reload_max_abs_diff": diff, "targets": plan.pattern, "rank": plan.rank, "alpha": plan.alpha,
            "modules": len(plan.matched), "trainable_parameters": self.n_params, "processes": self.processes.world,
            "peak_memory_bytes": self.peak_memory[0] if self.peak_memory else None,
            "peak_memory_measured_by": self.peak_memory[1] if self.peak_memory else None,
            "config": asdict(cfg),
        }
        eval_doc = None
        if cfg.eval_dataset:
            eval_doc = self._evaluate(self.model, self.loaded_name)
            summary["eval"] = {"results": eval_doc["results"], "deltas": eval_doc["deltas"]}
        (self.out / "nova_training.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "losses.json").write_text(json.dumps(self.losses) + "\n")
        return TrainResult(self.out, cfg.resolved_name(), self.step, self.losses[-1] if self.losses else None, diff,
                           eval_doc, self.losses, self.processes.world)

    def _check_reload(self) -> float:
        """Remove the PEFT layers, load the saved folder through the model's own `load_adapter`, and compare its
        vectors with the training forward's (in the model's dtype, without autocast)."""
        cfg = self.cfg
        probe_items = self._probe_items(self.triplets)
        with torch.no_grad():
            probe_rows = prepare_rows(self.inner, probe_items, cfg.max_length, ["probe"] * len(probe_items))
            expected, expected_multi = embed_rows(self.inner, probe_rows, True, True)
            expected = expected.cpu()
            expected_multi = [tokens[mask].cpu() for tokens, mask in zip(*expected_multi, strict=True)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = self.peft_model.unload()
        if cfg.gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.eval()
        self._check_resident_unchanged(model, self.resident_before)
        name = cfg.resolved_name()
        load_name = name if name not in model.list_adapters() else f"{name}-trained"
        try:
            model.load_adapter(load_name, str(self.out))
        except ValueError as exc:
            raise RuntimeError(f"the saved adapter does not load back into the model: {exc}") from exc
        reload_items = [dict(item, adapter=load_name) for item in probe_items]
        reloaded = torch.stack(model.encode(reload_items, batch_size=len(probe_items)))
        reloaded_multi = model.encode(reload_items, batch_size=len(probe_items), return_multivector=True)
        diff = float((reloaded - expected).abs().max())
        for got, want in zip(reloaded_multi, expected_multi, strict=True):
            diff = max(diff, float((got - want).abs().max()) if got.shape == want.shape else float("inf"))
        self.log(f"reload check: max |difference| between training forward and load_adapter vectors = {diff:.2e}")
        # fp32 agrees to rounding; bf16 (8 mantissa bits) rounds each of the two paths differently
        tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
        if diff > tolerance:
            raise RuntimeError(f"saved adapter gives different vectors than the training forward (max diff {diff}, "
                               f"tolerance {tolerance:g})")
        self.model, self.loaded_name = model, load_name
        return diff

    # -- helpers --
    def _probe_items(self, triplets: list[Triplet]) -> list[dict]:
        items = []
        for t in triplets[:4]:
            items += [t.query, t.positive]
        return [dict(item) for item in items]

    def _check_resident_unchanged(self, model, before: dict) -> None:
        for name, weights in before.items():
            current = model.adapter_state(name)[1]
            for module, (a, b) in weights.items():
                ca, cb = current[module]
                if not (torch.equal(a, ca) and torch.equal(b, cb)):
                    raise RuntimeError(f"resident adapter {name!r} changed during training ({module})")

    def _save_checkpoint(self) -> None:
        folder = self.out / CHECKPOINTS / f"step-{self.step:07d}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.peft_model.save_pretrained(str(tmp))
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "losses": self.losses, "config": asdict(self.cfg),
                    "data_sha256": self.data_sha256}, tmp / STATE_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        existing = sorted(p for p in (self.out / CHECKPOINTS).glob("step-*") if not p.name.endswith(".tmp"))
        for old in existing[: max(0, len(existing) - max(1, self.cfg.keep_checkpoints))]:
            shutil.rmtree(old, ignore_errors=True)
        self.log(f"checkpoint: {folder}")

    def _evaluate(self, model, load_name: str) -> dict:
        from nova.evaluation.dataset import load_beir
        from nova.evaluation.embedders import InProcessEmbedder
        from nova.evaluation.pipeline import evaluate_variants
        from nova.evaluation.variants import Variant

        cfg = self.cfg
        dataset = load_beir(cfg.eval_dataset, cfg.eval_split)
        start = "none"
        if cfg.init_adapter and not is_base_model_name(cfg.init_adapter):
            if cfg.init_adapter in model.list_adapters():
                start = cfg.init_adapter
            else:  # a folder: load it to measure the starting point
                start = f"{load_name}-start"
                model.load_adapter(start, cfg.init_adapter)
        common = {"query_task": cfg.query_task, "passage_task": cfg.passage_task,
                  "query_instructions": cfg.eval_instructions}
        variants = [
            Variant(name="before", query_adapter=start, passage_adapter=start,
                    description=f"starting point: {'adapter ' + start if start != 'none' else 'base model, no adapter'}",
                    **common),
            Variant(name="after", query_adapter=load_name, passage_adapter=load_name,
                    description=f"trained adapter {self.out}", **common),
        ]
        embedder = InProcessEmbedder(model, batch_size=32, show_progress=False, name=cfg.model or "tiny-random")
        self.log(f"held-out evaluation on {dataset.name} ({cfg.eval_split}): {len(dataset.queries)} queries, "
                 f"{len(dataset.corpus)} documents")
        return evaluate_variants(dataset, variants, "before", embedder, self.out / "eval", use_cache=False,
                                 log=self.log)


def train(config: TrainConfig, log=print) -> TrainResult:
    return Trainer(config, log).run()
