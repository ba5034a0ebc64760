"""Several LoRA adapters resident at once, routed per row inside one forward pass.

Adapters never touch the base weights: each targeted `nn.Linear` gets a forward hook that adds its LoRA delta,
`scaling * B(A(x))`, for each row through that row's own adapter. All resident adapters' matrices are stacked
(`LoraGroup`), and a per-row mask picks each row's adapter, so a forward dispatches the same operations
whatever mix of adapters its rows use: no loop over adapters, no host sync, no data-dependent shape (what a
CUDA graph needs). The cost is arithmetic over every resident adapter's rank for every row, small beside the
base matmuls while few adapters are resident. Loading or unloading is done under a lock, all-or-nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .processing_nova_embeddings_v1 import NO_ADAPTER

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NO_ROUTE = -1
logger = logging.getLogger(__name__)
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


# Linear layers that a transformer block feeds the very same input tensor (attention q/k/v, MLP gate/up): their
# LoRA down-projections run as one matmul. Only a speed-up: a member called with another input stays exact.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraGroup(nn.Module):
    """Every resident adapter's LoRA matrices for the targeted Linear layers that read one input, stacked so that
    a forward dispatches the same few operations whatever adapters its rows use (no loop over adapters, no
    data-dependent shape, so it can be captured in a CUDA graph):

        h = (x @ A.T) * mask       one matmul for every member, slot and rank; the mask keeps each row's own
                                   adapter's columns, times its scaling (zero for rows without an adapter)
        out_j += h_j @ B_j         one matmul per member Linear, in place

    `A` is [members * slots * rank, in_features] (member-major, then slot, then rank, zero-padded to the
    largest resident rank: padded ranks add exact zeros); `B<j>` is member j's [slots * rank, out_features],
    stored transposed so no transpose is dispatched. Both are non-persistent buffers: they follow the model's
    `.to()`/`.half()`/`.cuda()` and stay out of its `state_dict()`.
    """

    def __init__(self, members: tuple[str, ...], down: torch.Tensor, ups: list[torch.Tensor], width: int):
        super().__init__()
        self.members = members
        self.width = width  # one member's columns of h: slots * rank
        self.register_buffer("A", down, persistent=False)
        for j, up in enumerate(ups):
            self.register_buffer(f"B{j}", up, persistent=False)
        self._input: torch.Tensor | None = None
        self._masked: tuple[torch.Tensor, ...] | None = None  # h per member

    def up(self, member: int) -> torch.Tensor:
        return getattr(self, f"B{member}")

    def add_delta(self, member: int, x: torch.Tensor, mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` (the base Linear's) plus this member's LoRA delta for every row of `x`."""
        if self._input is not x:  # the first member to see this input computes h for all members
            h = F.linear(x, self.A) * mask
            h = h.reshape(-1, h.shape[-1])
            self._input, self._masked = x, h.split(self.width, dim=-1) if len(self.members) > 1 else (h,)
        h = self._masked[member]
        up = self.up(member)
        if torch.is_grad_enabled() or not output.is_contiguous():
            return output + (h @ up).view(output.shape)
        output.view(-1, output.shape[-1]).addmm_(h, up)
        return output

    def release(self) -> None:
        """Drop the forward's cached input and h (they hold activations)."""
        self._input = self._masked = None


@dataclass
class LoraRouting:
    """One forward's per-row masks, indexed from the mask tables: text rows [B, 1, k * width] by group size k
    (broadcast over positions), vision rows [N, k * width] by (N, k) (patches, or merged patches)."""

    text: dict[int, torch.Tensor]
    vision: dict[tuple[int, int], torch.Tensor]

    def mask(self, x: torch.Tensor, members: int) -> torch.Tensor | None:
        return self.text.get(members) if x.dim() == 3 else self.vision.get((x.shape[0], members))



def peft_folder(path: str) -> str:
    """The PEFT folder an adapter path names: the folder itself, or the folder of its `adapter_model.safetensors`
    (how Jina V4's card and vLLM's `--lora-modules` point at an adapter). The one rule for every place that
    takes an adapter path (`load_adapter`, the server's `--load-lora` and admin route). Raises ValueError."""
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if os.path.basename(path) == ADAPTER_WEIGHTS:
            return os.path.dirname(path) or "."
        raise ValueError(f"{path}: not a PEFT folder nor the {ADAPTER_WEIGHTS} of one")
    raise ValueError(f"{path}: does not exist")


def read_peft_folder(path: str, *, name_filter: str | None = None) -> dict[str, tuple[dict, dict[str, tuple]]]:
    """Read a PEFT LoRA folder (or its weights file, `peft_folder`). Returns {sub_adapter_name_or_'': (config,
    {module: (A, B)})}.

    Jina V4's combined adapter keeps several tasks in one folder as `lora_A.<task>.weight`; a standard
    PEFT folder has `lora_A.weight`, returned under the key ''.
    """
    path = peft_folder(path)
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
    and device) and the per-row routing of the forward pass in flight.

    Each resident adapter has a slot; a row's slot selects its row of the mask tables (`masks<k>`,
    [slots + 1, k * width], the last row all zeros for rows without an adapter). Loading or unloading an
    adapter rebuilds the stacks, completely, before anything is swapped in.
    """

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int):
        super().__init__()
        # A weak reference: the registry is the model's child, so a strong one would make a module cycle.
        self._owner = weakref.ref(model)
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.adapters: dict[str, LoraAdapter] = {}
        self.lock = threading.RLock()
        self.layers = nn.ModuleDict()  # group key -> LoraGroup
        self._located: dict[str, tuple[LoraGroup, int]] = {}  # target module name -> (its group, member index)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._slots: dict[int, int] = {}  # adapter_id -> slot
        self._rank = 0  # the stacks' rank: the largest resident one
        self._routing: LoraRouting | None = None
        self._next_id = 0
        self.generation = 0  # bumped whenever the stacks are rebuilt (captured CUDA graphs read the old ones)

    @property
    def model(self) -> nn.Module:
        return self._owner()

    @property
    def group_sizes(self) -> list[int]:
        return sorted({len(group.members) for group in self.layers.values()})

    def mask_table(self, members: int) -> torch.Tensor:
        return getattr(self, f"masks{members}")

    def weights(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (lora_A [r, in], lora_B [out, r])} of a resident adapter: views of the stacks the forward
        reads (model dtype and device), so an in-place edit is what the next forward computes with."""
        adapter = self.adapters[name]
        slot, width = self._slots[adapter.adapter_id], len(self._slots) * self._rank
        out = {}
        for module in adapter.targets:
            group, member = self._located[module]
            low = member * width + slot * self._rank
            a = group.A[low : low + adapter.rank]
            b = group.up(member)[slot * self._rank : slot * self._rank + adapter.rank].T
            out[module] = (a, b)
        return out

    def identity(self, name: str | None) -> int:
        """A number that changes whenever the adapter behind `name` is replaced (load, unload, reload)."""
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
            weights = {adapter.adapter_id: self.weights(name) for name, adapter in self.adapters.items()}
            adapters = list(self.adapters.values())
            for offset, (adapter, pairs) in enumerate(built):
                adapter.adapter_id = self._next_id + offset
                weights[adapter.adapter_id] = pairs
                adapters.append(adapter)
            self._rebuild(adapters, weights)
            self._next_id += len(built)

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise ValueError(f"unknown adapter {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}")
            kept = [adapter for other, adapter in self.adapters.items() if other != name]
            self._rebuild(kept, {adapter.adapter_id: self.weights(adapter.name) for adapter in kept})

    def _rebuild(self, adapters: list[LoraAdapter], weights: dict[int, dict[str, tuple]]) -> None:
        """Stack `adapters` (in slot order) into new groups and mask tables, then swap them in."""
        rank = max((adapter.rank for adapter in adapters), default=0)
        slots = {adapter.adapter_id: slot for slot, adapter in enumerate(adapters)}
        width = len(adapters) * rank
        modules = dict(self.model.named_modules())
        groups, located = {}, {}
        for key, members in _input_groups(sorted({m for adapter in adapters for m in adapter.targets})).items():
            like = modules[members[0]].weight
            down = torch.zeros(len(members) * width, modules[members[0]].in_features, dtype=like.dtype,
                               device=like.device)
            ups = [torch.zeros(width, modules[m].out_features, dtype=like.dtype, device=like.device) for m in members]
            for member, module in enumerate(members):
                for adapter in adapters:
                    pair = weights[adapter.adapter_id].get(module)
                    if pair is not None:
                        low, slot_low = member * width + slots[adapter.adapter_id] * rank, slots[adapter.adapter_id] * rank
                        down[low : low + adapter.rank] = pair[0]
                        ups[member][slot_low : slot_low + adapter.rank] = pair[1].T
            groups[key] = group = LoraGroup(members, down, ups, width)
            located.update({module: (group, member) for member, module in enumerate(members)})
        tables = {}
        for size in {len(group.members) for group in groups.values()}:
            like = next(group.A for group in groups.values() if len(group.members) == size)
            table = torch.zeros(len(adapters) + 1, size * width, dtype=like.dtype, device=like.device)
            for adapter in adapters:
                for member in range(size):
                    low = member * width + slots[adapter.adapter_id] * rank
                    table[slots[adapter.adapter_id], low : low + rank] = adapter.scaling
            tables[size] = table
        # everything is built: swap it in
        for hook in self._hooks:
            hook.remove()
        for name in [name for name, _ in self.named_buffers(recurse=False) if name.startswith("masks")]:
            delattr(self, name)
        self.layers = nn.ModuleDict(groups)
        for size, table in tables.items():
            self.register_buffer(f"masks{size}", table, persistent=False)
        self._located, self._slots, self._rank = located, slots, rank
        self.generation += 1
        self.adapters = {adapter.name: adapter for adapter in adapters}
        self._hooks = [modules[module].register_forward_hook(self._make_hook(group, member))
                       for module, (group, member) in located.items()]

    # ---- routing -------------------------------------------------------------------------------------

    def slot_indices(self, row_adapters: list[str | None]) -> list[int]:
        """Each row's row of the mask tables (the last one, all zeros, for rows without an adapter)."""
        none = self.no_slot
        return [none if name is None else self._slots[self.adapters[name].adapter_id] for name in row_adapters]

    @property
    def no_slot(self) -> int:
        """The mask tables' all-zero row: rows without an adapter."""
        return len(self._slots)

    @contextlib.contextmanager
    def route(self, row_adapters: list[str | None], image_rows: list[int], image_tokens: list[int], merge_unit: int):
        """Route each row to its adapter for the duration of one forward pass.

        `image_rows[i]` is the batch row of the i-th encoded image and `image_tokens[i]` its patch count:
        vision layers see all images' patches concatenated, so their masks are per patch (and per merged
        patch for the merger). A batch whose rows use no adapter runs no LoRA operation at all.
        """
        with self.lock:
            slots = self.slot_indices(row_adapters)
            none = self.no_slot
            if not self.layers or all(slot == none for slot in slots):
                yield
                return
            device = next(iter(self.layers.values())).A.device
            text = torch.tensor(slots, device=device)
            vision = None
            per_image = [slots[row] for row in image_rows]
            if any(slot != none for slot in per_image):
                patches = [slot for slot, count in zip(per_image, image_tokens, strict=True) for _ in range(count)]
                merged = [slot for slot, count in zip(per_image, image_tokens, strict=True)
                          for _ in range(count // merge_unit)]
                vision = torch.tensor(patches + merged, device=device).split([len(patches), len(merged)])
            with self.routed(self.routing_for(text, vision)):
                yield

    @contextlib.contextmanager
    def routed(self, routing: LoraRouting | None):
        """Make `routing` the one the LoRA hooks read (None: no LoRA) while the block runs."""
        self._routing = routing
        try:
            yield
        finally:
            self._routing = None
            for group in self.layers.values():
                group.release()

    def routing_for(self, text: torch.Tensor, vision: tuple[torch.Tensor, ...] | None = None) -> LoraRouting:
        """The masks of one forward from its rows' slot indices (device tensors): a fixed number of operations
        whatever the batch, so a CUDA graph can capture it with the indices in static buffers."""
        routing = LoraRouting(text={}, vision={})
        rows = text.unsqueeze(1)  # [B, 1]: each group size's mask indexed straight to [B, 1, k * width]
        for size in self.group_sizes:
            table = self.mask_table(size)
            routing.text[size] = table[rows]
            for index in vision or ():
                routing.vision[(index.shape[0], size)] = table[index]
        return routing

    def _make_hook(self, group: LoraGroup, member: int):
        def hook(module, inputs, output):
            routing = self._routing
            mask = routing.mask(inputs[0], len(group.members)) if routing is not None else None
            return output if mask is None else group.add_delta(member, inputs[0], mask, output)

        return hook


def _input_groups(modules: list[str]) -> dict[str, tuple[str, ...]]:
    """{group key: member module names}: siblings that read the same input (SHARED_INPUT) form one group, any
    other target is a group of its own. Keys are module names with '.' -> '__' (a ModuleDict's rule)."""
    groups: dict[str, tuple[str, ...]] = {}
    taken = set()
    for module in modules:
        if module in taken:
            continue
        parent, _, leaf = module.rpartition(".")
        siblings = next((family for family in SHARED_INPUT if leaf in family), (leaf,))
        members = tuple(f"{parent}.{name}" if parent else name for name in siblings
                        if (f"{parent}.{name}" if parent else name) in modules)
        taken.update(members)
        key = (parent + "." if parent else "") + "+".join(m.rpartition(".")[2] for m in members)
        groups[key.replace(".", "__")] = members
    return groups


class AdapterMixin:
    """The model's adapter API (`load_adapter`, `unload_adapter`, `list_adapters`, `adapter_state`, the task
    adapters a checkpoint ships), next to the registry it drives. Mixed into the model class, as PEFT's
    `PeftAdapterMixin` is into transformers' models; it reads the model's `lora`, `prefix_cache`, `processor`
    and `config`."""

    def record_absent_task_adapters(self, log: bool = True) -> None:
        """Task adapters the checkpoint did not ship route their tasks to the base model; say so once, loudly.
        (A task adapter unloaded later is not absent: its tasks then fail until it is loaded again.)"""
        if self.processor is None:
            return
        routed = {route.get("adapter") for route in self.config.task_routing.values()} - {None}
        absent = frozenset(routed - set(self.lora.adapters))
        self.processor.absent_task_adapters = absent
        if absent and log:
            logger.warning("no weights for task adapter(s) %s: their tasks run on the base model",
                           ", ".join(sorted(absent)))

    def load_task_adapters(self, adapters_dir: str) -> list[str]:
        """Jina V4's combined adapter folder (one PEFT folder, `lora_A.<task>`) or one PEFT folder per
        adapter (`adapters/<name>/`). Folders without weights (a repo checkout without LFS files) are skipped."""
        if not os.path.isdir(adapters_dir):
            return []
        if os.path.isfile(os.path.join(adapters_dir, "adapter_model.safetensors")):
            return self.load_adapter(None, adapters_dir)
        loaded = []
        for name in sorted(os.listdir(adapters_dir)):
            folder = os.path.join(adapters_dir, name)
            if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
                loaded += self.load_adapter(name, folder)
        return loaded

    @property
    def max_loras(self) -> int:
        return self.lora.max_loras

    @property
    def max_lora_rank(self) -> int:
        return self.lora.max_lora_rank

    def load_adapter(self, name: str | None, path: str) -> list[str]:
        """Load a PEFT LoRA folder under `name`. A Jina V4 combined folder (name None) loads one adapter per
        task it holds. `path` may also be the folder's `adapter_model.safetensors`. Validated completely before
        anything changes; raises ValueError otherwise."""
        path = peft_folder(str(path))
        parts = read_peft_folder(path)
        if name is None:
            unnamed = [sub for sub in parts if not sub]
            if unnamed:
                raise ValueError(f"{path}: a standard PEFT folder needs an adapter name")
            built = [self.lora.build(sub, config, pairs, str(path)) for sub, (config, pairs) in sorted(parts.items())]
        else:
            if len(parts) != 1:
                raise ValueError(f"{path}: holds several adapters ({', '.join(sorted(parts))}); load it without a name")
            (config, pairs), = parts.values()
            check_targets(config, pairs, name)
            built = [self.lora.build(name, config, pairs, str(path))]
        self.lora.add(built)
        return [adapter.name for adapter, _ in built]

    def unload_adapter(self, name: str) -> None:
        with self.lora.lock:
            adapter_id = self.lora.identity(name) if name in self.lora.adapters else None
            self.lora.remove(name)
            self.prefix_cache.invalidate_adapter(adapter_id)

    def list_adapters(self) -> dict[str, dict]:
        return {name: adapter.describe() for name, adapter in sorted(self.lora.adapters.items())}

    def adapter_state(self, name: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """A resident adapter's (PEFT config, {module: (lora_A, lora_B)}), as copies: to continue training it
        or to check it is unchanged."""
        with self.lora.lock:
            adapter = self.lora.adapters.get(name)
            if adapter is None:
                raise ValueError(f"unknown adapter {name!r}; loaded: {', '.join(sorted(self.lora.adapters)) or 'none'}")
            config = {**adapter.config, "r": adapter.rank, "lora_alpha": adapter.alpha}
            weights = self.lora.weights(name)
            return config, {module: (a.detach().clone(), b.detach().clone()) for module, (a, b) in weights.items()}


def check_targets(config: dict, pairs: dict, name: str) -> None:
    """A folder's declared target_modules must match the modules it carries weights for (PEFT semantics)."""

    targets = config.get("target_modules")
    if targets is None:
        return
    if isinstance(targets, str):
        pattern = re.compile(targets)
        unmatched = [m for m in pairs if not pattern.fullmatch(m) and not pattern.fullmatch("base_model.model." + m)]
    else:
        unmatched = [m for m in pairs if not any(m == t or m.endswith("." + t) for t in targets)]
    if unmatched:
        raise ValueError(f"adapter {name!r}: weights for {unmatched[0]!r}, which target_modules {targets!r} does not name")


__all__ = ["LoraRegistry", "LoraAdapter", "LoraGroup", "LoraRouting", "AdapterMixin", "read_peft_folder",
           "peft_folder", "normalize_module_name"]
