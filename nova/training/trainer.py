"""PEFT LoRA training of a new Nova adapter.

How the pieces fit:
- the model is loaded as usual (`nova.loading.load_model`); its resident task adapters stay untouched.
- `peft.get_peft_model` wraps the chosen `nn.Linear` modules of that model in place with a trainable LoRA
  (adapter "default"); every training row is routed to *no* resident adapter, so the forward is base
  weights + the LoRA being trained.
- the forward is the model's own `forward_hidden` on rows prepared by its own processor (same rendering,
  instructions, images and pooling masks as `encode`), pooled here with gradients (masked mean +
  L2-normalize; multi-vector: projector output on the non-instruction tokens, normalized per token).
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
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from nova.command import check_adapter_path, prepare_output_folder, warn_random_weights
from nova.evaluation.errors import UserInputError
from nova.model_config import read_model_config
from nova.repo import is_base_model_name

from .data import Triplet, item_key, load_triplets
from .loss import cosine_scores, duplicate_mask, info_nce, maxsim_scores

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
RESUME_MAY_DIFFER = ("data", "out", "resume", "overwrite", "name", "checkpoint_every", "keep_checkpoints", "eval_dataset",
                     "eval_split", "eval_instructions", "device", "gradient_checkpointing", "progress", "log_every")
# What a run writes into --out (globs): what --overwrite deletes; a folder holding anything else is refused.
OUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", CHECKPOINTS, "eval",
             "nova_training.json", "losses.json")


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
    batch_size: int = 16
    grad_accum: int = 1
    temperature: float = 0.05
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

class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        self.cfg = config
        self.log = log
        self.out = Path(config.out)

    # -- setup --
    def _validate(self) -> None:
        cfg = self.cfg
        if cfg.vectors not in ("single", "multi", "both"):
            raise UserInputError("--vectors must be single, multi or both")
        if cfg.schedule not in ("constant", "linear", "cosine"):
            raise UserInputError("--schedule must be constant, linear or cosine")
        for name in ("batch_size", "grad_accum"):
            if getattr(cfg, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
        if cfg.steps is not None and cfg.steps < 1:
            raise UserInputError("--steps must be at least 1")
        if cfg.epochs <= 0:
            raise UserInputError("--epochs must be positive")
        if cfg.temperature <= 0:
            raise UserInputError("--temperature must be positive")
        if cfg.lr <= 0:
            raise UserInputError("--lr must be positive")
        if cfg.rank is not None and cfg.rank < 1:
            raise UserInputError("--rank must be at least 1")
        if not 0 <= cfg.dropout < 1:
            raise UserInputError("--dropout must be in [0, 1)")
        if cfg.eval_dataset and not Path(cfg.eval_dataset).is_dir():
            raise UserInputError(f"--eval-dataset: folder not found: {cfg.eval_dataset}")

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

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._validate()
        triplets = load_triplets(cfg.data, cfg.query_task, cfg.passage_task, cfg.max_negatives)
        resume_from = self._checkpoint_to_resume()
        prepare_output_folder(self.out, prog="nova train", ours=OUT_FILES, overwrite=cfg.overwrite,
                              resume=resume_from is not None, resumable=True)
        data_sha256 = _file_sha256(cfg.data)
        state = None
        if resume_from is not None:
            state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
            self._check_resume_settings(resume_from, state, data_sha256)
        self.data_sha256 = data_sha256

        from nova.evaluation.cli import load_in_process

        warn_random_weights("nova train", read_model_config(cfg.model).random_weights)
        model = load_in_process(cfg.model, cfg.device, [])
        self.log(f"{len(triplets)} training examples from {cfg.data}; model {cfg.model or 'tiny random-weight checkpoint'}")
        resident_before = {name: model.adapter_state(name)[1] for name in model.list_adapters()}

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
            pattern = _compact_regex(sorted(init_pairs), all_names)
            matched = sorted(init_pairs)
            use_rslora = bool(init_config.get("use_rslora"))
        else:
            rank = cfg.rank or 16
            alpha = cfg.alpha if cfg.alpha is not None else 2.0 * rank
            pattern, matched = resolve_targets(model, cfg.targets)
            use_rslora = False
        has_images = any("image" in item for t in triplets for item in (t.query, t.positive, *t.negatives))
        if matched and all(name.startswith("visual.") for name in matched) and not has_images:
            raise UserInputError(f"--targets {cfg.targets!r} only reaches the vision tower, but {cfg.data} has no "
                                 "images: nothing would train")
        if rank > model.max_lora_rank:
            self.log(f"warning: rank {rank} exceeds this model's max_lora_rank {model.max_lora_rank}; "
                     f"servers must be started with --max-lora-rank >= {rank} to load it")

        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # pragma: no cover
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora_config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=pattern, bias="none",
            use_rslora=use_rslora, init_lora_weights=True,
        )
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config)
        inner = _inner(peft_model)
        if init_pairs is not None:
            with torch.no_grad():
                for module_name, (a, b) in init_pairs.items():
                    layer = inner.get_submodule(module_name)
                    layer.lora_A["default"].weight.copy_(a)
                    layer.lora_B["default"].weight.copy_(b)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in trainable)
        self.log(f"LoRA rank {rank}, alpha {alpha:g} on {len(matched)} modules ({n_params:,} trainable parameters); "
                 f"targets: {pattern}")

        n = len(triplets)
        per_epoch = max(1, n // cfg.batch_size) if n >= cfg.batch_size else 1
        total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.schedule, cfg.warmup_steps, total_steps))
        step = 0
        losses: list[float] = []
        if state is not None:
            from safetensors.torch import load_file

            weights = load_file(str(resume_from / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(peft_model, weights)
            if getattr(result, "unexpected_keys", None):
                raise UserInputError(f"--resume {resume_from}: adapter weights do not fit ({result.unexpected_keys[:2]})")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
            losses = list(state.get("losses", []))
            torch.set_rng_state(state["torch_rng"])
            self.log(f"resumed from {resume_from} at step {step}/{total_steps}")

        self.out.mkdir(parents=True, exist_ok=True)
        want_single = cfg.vectors in ("single", "both")
        want_multi = cfg.vectors in ("multi", "both")

        def micro_batch(index: int) -> list[Triplet]:
            if n < cfg.batch_size:
                return triplets
            epoch, position = divmod(index, per_epoch)
            order = list(range(n))
            random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
            return [triplets[i] for i in order[position * cfg.batch_size : (position + 1) * cfg.batch_size]]

        def loss_of(batch: list[Triplet]) -> torch.Tensor:
            queries = [t.query for t in batch]
            candidates = [t.positive for t in batch] + [neg for t in batch for neg in t.negatives]
            where_q = [f"{cfg.data} line {t.line}: query" for t in batch]
            where_c = [f"{cfg.data} line {t.line}: positive" for t in batch] + [
                f"{cfg.data} line {t.line}: negatives[{i}]" for t in batch for i in range(len(t.negatives))]
            q_rows = prepare_rows(inner, queries, cfg.max_length, where_q)
            c_rows = prepare_rows(inner, candidates, cfg.max_length, where_c)
            ignore = duplicate_mask([item_key(t.positive) for t in batch], [item_key(c) for c in candidates])
            q_single, q_multi = embed_rows(inner, q_rows, want_single, want_multi)
            c_single, c_multi = embed_rows(inner, c_rows, want_single, want_multi)
            loss = torch.zeros((), device=inner.device)
            if want_single:
                loss = loss + info_nce(cosine_scores(q_single, c_single), cfg.temperature, ignore)
            if want_multi:
                scores = maxsim_scores(q_multi[0], q_multi[1], c_multi[0], c_multi[1])
                loss = loss + info_nce(scores, cfg.temperature, ignore)
            return loss

        peft_model.train()
        progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
        started = time.perf_counter()
        recent: list[float] = []
        warned_no_grad = False
        while step < total_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for k in range(cfg.grad_accum):
                loss = loss_of(micro_batch(step * cfg.grad_accum + k)) / cfg.grad_accum
                if loss.requires_grad:
                    loss.backward()
                elif not warned_no_grad:  # e.g. a projector-only adapter and a micro-batch without images
                    self.log("note: a micro-batch reached none of the adapter's target modules (no gradient); "
                             "it is skipped")
                    warned_no_grad = True
                step_loss += float(loss.detach())
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(step_loss)
            recent = (recent + [step_loss])[-20:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if not progress and (step % max(1, cfg.log_every) == 0 or step == total_steps):
                self.log(f"step {step}/{total_steps} loss {sum(recent) / len(recent):.4f} "
                         f"lr {scheduler.get_last_lr()[0]:.2e} ({time.perf_counter() - started:.0f}s)")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                self._save_checkpoint(peft_model, optimizer, scheduler, step, losses)
        bar.close()
        peft_model.eval()
        elapsed = time.perf_counter() - started

        # final adapter: a standard PEFT folder
        peft_model.save_pretrained(str(self.out))
        self.log(f"saved adapter to {self.out} (adapter_config.json + adapter_model.safetensors) after {step} steps, "
                 f"{elapsed:.0f}s")

        # vectors from the training forward, to check the saved folder against
        probe_items = self._probe_items(triplets)
        with torch.no_grad():
            probe_rows = prepare_rows(inner, probe_items, cfg.max_length, ["probe"] * len(probe_items))
            expected, expected_multi = embed_rows(inner, probe_rows, True, True)
            expected = expected.cpu()
            expected_multi = [tokens[mask].cpu() for tokens, mask in zip(*expected_multi, strict=True)]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft_model.unload()
        if cfg.gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.eval()
        self._check_resident_unchanged(model, resident_before)

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

        summary = {
            "name": name, "steps": step, "examples": n, "elapsed_seconds": round(elapsed, 1),
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "reload_max_abs_diff": diff, "targets": pattern, "rank": rank, "alpha": alpha,
            "modules": len(matched), "trainable_parameters": n_params, "config": asdict(cfg),
        }
        eval_doc = None
        if cfg.eval_dataset:
            eval_doc = self._evaluate(model, load_name)
            summary["eval"] = {"results": eval_doc["results"], "deltas": eval_doc["deltas"]}
        (self.out / "nova_training.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "losses.json").write_text(json.dumps(losses) + "\n")
        self.model = model
        self.loaded_name = load_name
        return TrainResult(self.out, name, step, losses[-1] if losses else None, diff, eval_doc, losses)

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

    def _save_checkpoint(self, peft_model, optimizer, scheduler, step: int, losses: list[float]) -> None:
        folder = self.out / CHECKPOINTS / f"step-{step:07d}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(str(tmp))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "losses": losses, "config": asdict(self.cfg), "torch_rng": torch.get_rng_state(),
                    "data_sha256": self.data_sha256}, tmp / STATE_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        existing = sorted(p for p in (self.out / CHECKPOINTS).glob("step-*") if not p.name.endswith(".tmp"))
        for old in existing[: max(0, len(existing) - max(1, self.cfg.keep_checkpoints))]:
            shutil.rmtree(old, ignore_errors=True)
        self.log(f"checkpoint: {folder}")

    def _evaluate(self, model, load_name: str) -> dict:
        from nova.evaluation.cli import evaluate_variants
        from nova.evaluation.dataset import load_beir
        from nova.evaluation.embedders import InProcessEmbedder
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
