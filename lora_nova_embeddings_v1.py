"""Several LoRA adapters resident at once, routed per row inside one forward pass.

Adapters never touch the base weights: each targeted `nn.Linear` gets a forward hook that adds
`scale * B(A(x))` for the rows routed to each adapter (grouped, one small matmul pair per adapter present
in the batch, like punica/S-LoRA's gather-scatter). The matrices are non-persistent buffers of
`MultiLoraLayer` modules under the model's `lora` child, so they follow every dtype/device move of the
model while base state-dict keys stay Jina V4's; loading or unloading is done under a lock, all-or-nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import weakref
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn

from .processing_nova_embeddings_v1 import NO_ADAPTER

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NO_ROUTE = -1
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


def normalize_module_name(key: str) -> str:
    """PEFT key prefix and both Qwen2.5-VL naming generations -> this model's module names."""
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    for old, new in (("model.language_model.", "model."), ("model.visual.", "visual."), ("language_model.", "model.")):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@dataclass
class LoraAdapter:
    """One resident adapter's description. Its matrices live in the model's `MultiLoraLayer` modules (so they
    follow every `.to()`), under `adapter_id`, which is never reused: it identifies these exact weights."""

    name: str
    rank: int
    alpha: float
    scaling: float
    targets: tuple[str, ...]
    path: str = ""
    config: dict = field(default_factory=dict)
    adapter_id: int = -1

    def describe(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": len(self.targets), "path": self.path}


class MultiLoraLayer(nn.Module):
    """The LoRA matrices of every resident adapter for ONE targeted `nn.Linear`, as non-persistent buffers
    (`A<id>`, `B<id>`): they move with the model on `.to()`/`.half()`/`.cuda()`, and stay out of the base
    model's `state_dict()` (its keys remain Jina V4's). `delta()` adds each row group's `scale * B(A(x))`."""

    def __init__(self):
        super().__init__()
        self.scalings: dict[int, float] = {}

    def add(self, adapter_id: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        self.register_buffer(f"A{adapter_id}", a, persistent=False)
        self.register_buffer(f"B{adapter_id}", b, persistent=False)
        self.scalings[adapter_id] = scaling

    def remove(self, adapter_id: int) -> None:
        for ab in "AB":
            delattr(self, f"{ab}{adapter_id}")
        del self.scalings[adapter_id]

    def pair(self, adapter_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"A{adapter_id}"), getattr(self, f"B{adapter_id}")

    def delta(self, x: torch.Tensor, output: torch.Tensor, groups) -> torch.Tensor:
        for adapter_id, rows in groups or ():
            if adapter_id not in self.scalings:
                continue
            a, b = self.pair(adapter_id)
            scaling = self.scalings[adapter_id]
            if isinstance(rows, slice):  # a contiguous block of rows: views, no gather/scatter copies
                if torch.is_grad_enabled():
                    delta = (x[rows] @ a.T @ b.T) * scaling
                    output = torch.cat([output[: rows.start], output[rows] + delta, output[rows.stop :]])
                elif output.is_contiguous():  # two kernels (on a GPU each is a launch): x·A, then out += s·(xA)·B
                    block = output[rows].view(-1, output.shape[-1])
                    block.addmm_(x[rows].reshape(-1, x.shape[-1]) @ a.T, b.T, alpha=scaling)
                else:
                    output[rows] += (x[rows] @ a.T @ b.T) * scaling
            else:
                rows = rows.to(x.device)
                delta = (x.index_select(0, rows) @ a.T @ b.T) * scaling
                output = output.index_add(0, rows, delta.to(output.dtype))
        return output


def read_peft_folder(path: str, *, name_filter: str | None = None) -> dict[str, tuple[dict, dict[str, tuple]]]:
    """Read a PEFT LoRA folder. Returns {sub_adapter_name_or_'': (config, {module: (A, B)})}.

    Jina V4's combined adapter keeps several tasks in one folder as `lora_A.<task>.weight`; a standard
    PEFT folder has `lora_A.weight`, returned under the key ''.
    """
    config_path = os.path.join(path, ADAPTER_CONFIG)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise ValueError(f"{path}: no {ADAPTER_CONFIG}; an adapter is a PEFT folder")
    if not os.path.isfile(weights_path):
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS}")
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"{path}: {flag}=true is not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern/alpha_pattern are not supported")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save is not supported by per-row routing")
    try:
        tensors = load_file(weights_path)
    except Exception as exc:
        raise ValueError(f"{weights_path}: cannot be read ({exc})") from None
    grouped: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise ValueError(f"{path}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        sub = match["name"] or ""
        if name_filter is not None and sub and sub != name_filter:
            continue
        module = normalize_module_name(match["module"])
        grouped.setdefault(sub, {}).setdefault(module, {})[match["ab"]] = tensor
    out = {}
    for sub, modules in grouped.items():
        pairs = {}
        for module, ab in modules.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{path}: module {module!r} has lora_{'A' if 'A' in ab else 'B'} without its pair")
            pairs[module] = (ab["A"], ab["B"])
        out[sub] = (config, pairs)
    if not out:
        raise ValueError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return out


class LoraRegistry(nn.Module):
    """The resident adapters of one model (a child module of it, so their matrices follow the model's dtype
    and device) and the per-row routing of the forward pass in flight."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int):
        super().__init__()
        # A weak reference: the registry is the model's child, so a strong one would make a module cycle.
        self._owner = weakref.ref(model)
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.adapters: dict[str, LoraAdapter] = {}
        self.lock = threading.RLock()
        self.layers = nn.ModuleDict()  # "<target module name with . -> __>" -> MultiLoraLayer
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._text_route: list | None = None
        self._vision_routes: dict[int, list] = {}
        self._next_id = 0

    @property
    def model(self) -> nn.Module:
        return self._owner()

    def layer(self, module_name: str) -> MultiLoraLayer | None:
        key = module_name.replace(".", "__")
        return self.layers[key] if key in self.layers else None

    def weights(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (lora_A, lora_B)} of a resident adapter, as they are now (model dtype and device)."""
        adapter = self.adapters[name]
        return {module: self.layer(module).pair(adapter.adapter_id) for module in adapter.targets}

    def identity(self, name: str | None) -> int:
        """A number that changes whenever the weights behind `name` change (load, unload, reload)."""
        return NO_ROUTE if name is None else self.adapters[name].adapter_id

    # ---- loading -------------------------------------------------------------------------------------

    def build(self, name: str, config: dict, pairs: dict, path: str = "") -> tuple[LoraAdapter, dict]:
        """Validate one adapter against the model (shapes, rank, targets) without changing anything. Returns
        the adapter and its matrices, already in each target's dtype and on its device."""
        if not name or not isinstance(name, str) or name.lower() in NO_ADAPTER:
            raise ValueError(f"invalid adapter name {name!r}")
        modules = dict(self.model.named_modules())
        rank = int(config.get("r", 0)) or next(iter(pairs.values()))[0].shape[0]
        if rank > self.max_lora_rank:
            raise ValueError(f"adapter {name!r}: rank {rank} exceeds max_lora_rank {self.max_lora_rank}")
        alpha = float(config.get("lora_alpha", rank))
        scaling = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
        weights = {}
        for module_name, (a, b) in pairs.items():
            target = modules.get(module_name)
            if not isinstance(target, nn.Linear):
                kind = "does not exist" if target is None else f"is a {type(target).__name__}, not a Linear layer"
                raise ValueError(f"adapter {name!r}: target module {module_name!r} {kind} in this model")
            if a.dim() != 2 or b.dim() != 2 or a.shape != (rank, target.in_features) or b.shape != (target.out_features, rank):
                raise ValueError(
                    f"adapter {name!r}: module {module_name!r} expects lora_A [{rank}, {target.in_features}] and "
                    f"lora_B [{target.out_features}, {rank}], got {list(a.shape)} and {list(b.shape)}"
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"adapter {name!r}: module {module_name!r} has non-finite LoRA weights")
            device, dtype = target.weight.device, target.weight.dtype
            weights[module_name] = (a.to(device, dtype), b.to(device, dtype))
        adapter = LoraAdapter(name=name, rank=rank, alpha=alpha, scaling=scaling, targets=tuple(weights), path=path,
                              config=config)
        return adapter, weights

    def add(self, built: list[tuple[LoraAdapter, dict]]) -> None:
        """Make validated adapters resident, all or none."""
        with self.lock:
            names = [adapter.name for adapter, _ in built]
            clash = [n for n in names if n in self.adapters] or [n for n in set(names) if names.count(n) > 1]
            if clash:
                raise ValueError(f"adapter {clash[0]!r} is already loaded; unload it first")
            if len(self.adapters) + len(built) > self.max_loras:
                raise ValueError(
                    f"loading {len(built)} more adapter(s) would exceed max_loras={self.max_loras} "
                    f"({len(self.adapters)} loaded: {', '.join(sorted(self.adapters)) or 'none'})"
                )
            for adapter, weights in built:
                adapter.adapter_id = self._next_id
                self._next_id += 1
                self.adapters[adapter.name] = adapter
                for module_name, (a, b) in weights.items():
                    layer = self.layer(module_name)
                    if layer is None:
                        layer = self.layers[module_name.replace(".", "__")] = MultiLoraLayer()
                        module = self.model.get_submodule(module_name)
                        self._hooks[module_name] = module.register_forward_hook(self._make_hook(layer))
                    layer.add(adapter.adapter_id, a, b, adapter.scaling)

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise ValueError(f"unknown adapter {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}")
            adapter = self.adapters.pop(name)
            for module_name in adapter.targets:
                layer = self.layer(module_name)
                layer.remove(adapter.adapter_id)
                if not layer.scalings:
                    del self.layers[module_name.replace(".", "__")]
                    self._hooks.pop(module_name).remove()

    # ---- routing -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def route(self, row_adapters: list[str | None], image_rows: list[int], image_tokens: list[int], merge_unit: int):
        """Route each row to its adapter for the duration of one forward pass.

        `image_rows[i]` is the batch row of the i-th encoded image and `image_tokens[i]` its patch count:
        vision layers see all images' patches concatenated, so their routes are per patch (and per merged
        patch for the merger). Row groups are computed once here, not in every layer.
        """
        with self.lock:
            ids = torch.tensor([self.identity(a) for a in row_adapters], dtype=torch.long)
            self._text_route = _groups(ids)
            self._vision_routes = {}
            if image_rows:
                per_image = ids[torch.tensor(image_rows, dtype=torch.long)]
                counts = torch.tensor(image_tokens, dtype=torch.long)
                for route in (per_image.repeat_interleave(counts), per_image.repeat_interleave(counts // merge_unit)):
                    self._vision_routes[len(route)] = _groups(route)
            try:
                yield
            finally:
                self._text_route = None
                self._vision_routes = {}

    def _make_hook(self, layer: MultiLoraLayer):
        def hook(module, inputs, output):
            if self._text_route is None:
                return output
            x = inputs[0]
            groups = self._text_route if x.dim() == 3 else self._vision_routes.get(x.shape[0])
            return layer.delta(x, output, groups)

        return hook


def _groups(route: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
    """[(adapter_id, rows)] for every adapter present: a slice when its rows are contiguous (the model sorts
    rows by adapter, so they are), else an index tensor."""
    groups = []
    for adapter_id in torch.unique(route).tolist():
        if adapter_id == NO_ROUTE:
            continue
        rows = (route == adapter_id).nonzero().squeeze(1)
        start, stop = int(rows[0]), int(rows[-1]) + 1
        groups.append((adapter_id, slice(start, stop) if stop - start == len(rows) else rows))
    return groups


__all__ = ["LoraRegistry", "LoraAdapter", "MultiLoraLayer", "read_peft_folder", "normalize_module_name"]
