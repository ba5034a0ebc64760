"""The work on rows, the same in one process and on Ray: load items, then embed them with the model.

`load_items` (CPU, no model): applies the command-line defaults and reads and decodes images, so that an
unreadable image becomes an error record early. `prepare_records` (CPU, a processor without the model):
renders and tokenizes the items without an image, so that on Ray the model's actor receives them ready to
pack, and resizes images to the model's input size. `ModelWorker` holds the model: it tokenizes the items
that come unprepared (all of them in one process, rows with an image on Ray) with the processor's
`prepare_item`, routes every row to its adapter by the model's own rule, packs rows by token budget (rows x
longest row <= `max_batch_tokens`, as the server's batcher does) and runs the packs through `embed_batches`,
the path the server's batches take (and so the instruction prefix cache). As in `encode()`, each pack is
launched before the previous one's vectors are read, and on a GPU the next window of records is prepared
between launches (`windowed_batches`), so the device is not left idle while the host works. A pack that
fails is retried row by row, so a bad row costs only itself.

A record is a dict: `position` and `id` always; then `item` (the row's fields), `prepared` (the tokenized
row, `PreparedItem.as_fields()`, beside an `item` that keeps only the routing keys), `error` or `vector`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_MAX_BATCH_TOKENS = 16_384
DEFAULT_MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class ItemDefaults:
    """Command-line defaults for fields a row does not set (a row's own value wins)."""

    task: str | None = None
    adapter: str | None = None  # "none" = the base model
    instructions: str | None = None

    def apply(self, item: dict) -> dict:
        out = dict(item)
        for key in ("task", "adapter", "instructions"):
            value = getattr(self, key)
            if value is not None and key not in out:
                out[key] = value
        return out


def load_items(records: list[dict], defaults: ItemDefaults, max_image_pixels: int) -> list[dict]:
    """Defaults applied, images read and decoded (to RGB PIL images); failures become error records."""
    from nova.repo import model_class

    decode_image = model_class("decode_image")
    out = []
    for record in records:
        if "error" in record:
            out.append(record)
            continue
        item = defaults.apply(record["item"])
        if item.get("image") is not None:
            try:
                item["image"] = decode_image(item["image"], index=record["position"], allow_paths=True,
                                             max_image_pixels=max_image_pixels)
            except ValueError as exc:
                out.append({**_strip(record), "error": str(exc)})
                continue
        out.append({**record, "item": item})
    return out


# The item fields that choose a row's task and adapter: kept beside a prepared row, so that the model's processor,
# which knows which adapters are resident, makes the routing decision (a missing 'adapter' inherits the task's).
ROUTING_KEYS = ("task", "adapter")


def prepare_records(records: list[dict], processor, options: EmbedOptions) -> list[dict]:
    """Items without an image rendered and tokenized (`processor.prepare_item`, as `ModelWorker` would), as plain
    fields that any copy of the model code rebuilds; failures become error records. The processor routes by the
    config alone, so an unknown task fails here, while a named adapter is checked by the model's stage.

    A row with an image passes on untokenized, its image resized to the model's input size (`fit_image`: the
    same patches, bit for bit; at most max_pixels x 3 bytes, and a large photo's costly resize done here); the
    model's stage patchifies it between its launches, because patches (float32) take 8x the image's bytes, too
    much to hold a shard of in Ray's object store. An image the size rule refuses passes on as it came, so that
    the model's stage reports it as it would in one process."""
    out = []
    for record in records:
        if "error" in record:
            out.append(record)
            continue
        item = record["item"]
        if item.get("image") is not None:
            out.append(_fitted(record, processor, options))
            continue
        try:
            prepared = processor.prepare_item(item, index=record["position"], max_pixels=options.max_pixels,
                                              max_length=options.max_length, prompt_set=options.prompt_set)
        except ValueError as exc:
            out.append({**_strip(record), "error": str(exc)})
            continue
        routing = {key: item[key] for key in ROUTING_KEYS if key in item}
        out.append({**_strip(record), "item": routing, "prepared": prepared.as_fields()})
    return out


def _fitted(record: dict, processor, options: EmbedOptions) -> dict:
    item = record["item"]
    try:
        image = processor.fit_image(item["image"], max_pixels=options.max_pixels, index=record["position"])
    except ValueError:
        return record
    return {**record, "item": {**item, "image": image}}


def _strip(record: dict) -> dict:
    return {"position": record["position"], "id": record["id"]}


def pack_by_token_budget(rows: list, max_batch_tokens: int, max_batch_size: int) -> list[list]:
    """Length-sorted packs where rows x longest row <= max_batch_tokens and rows <= max_batch_size (a row
    longer than the budget runs alone)."""
    packs: list[list] = []
    current: list = []
    for row in sorted(rows, key=lambda r: r.num_tokens):
        if current and (row.num_tokens * (len(current) + 1) > max_batch_tokens or len(current) >= max_batch_size):
            packs.append(current)
            current = []
        current.append(row)
    if current:
        packs.append(current)
    return packs


@dataclass
class EmbedOptions:
    """Everything that decides a vector (recorded in the output's settings manifest)."""

    multivector: bool = False
    dimensions: int | None = None
    max_pixels: int | None = None
    max_length: int | None = None
    prompt_set: str | None = None
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    load_lora: list[tuple[str, str]] = field(default_factory=list)
    cuda_graphs: bool = False  # replay text-only batches through CUDA graphs (same vectors; CUDA only)


class ModelWorker:
    """The model stage: one model, records in, result records (`vector` or `error`) out."""

    def __init__(self, model_ref: str | None, options: EmbedOptions, device: str | None = None,
                 dtype: str | None = None, trust_remote_code: bool = False, model=None):
        self.options = options
        if model is None:
            from nova.loading import load_model

            model = load_model(model_ref, device=device, dtype=_torch_dtype(dtype),
                               trust_remote_code=True if model_ref is None else trust_remote_code)
            for name, path in options.load_lora:
                model.load_adapter(name, path)
        self.model = model
        model.check_dimensions(options.dimensions, options.multivector)
        if options.cuda_graphs:
            model.configure_cuda_graphs(True, max_rows=options.max_batch_size)

    def embed(self, records: list[dict]) -> list[dict]:
        o = self.options
        results: dict[int, dict] = {}

        def prepare(start: int, stop: int) -> list:
            """Records [start, stop) as prepared rows; a record that fails to prepare gets its error result."""
            rows = []
            for record in records[start:stop]:
                if "error" in record:
                    results[record["position"]] = record
                    continue
                try:
                    rows.append(self._prepared_row(record))
                except ValueError as exc:
                    results[record["position"]] = {**_strip(record), "error": str(exc)}
            return rows

        ids = {record["position"]: record["id"] for record in records}
        # on a GPU, windows that grow from one pack, each prepared between the launches of the one before;
        # elsewhere the call's records at once, packed over all of them (the least padding)
        overlap = self.model.launches_ahead
        windows = (self.model.sort_windows(len(records), o.max_batch_size, ramp=True) if overlap
                   else [(0, len(records))])
        packs = self.model.windowed_batches(
            windows, prepare, lambda rows: pack_by_token_budget(rows, o.max_batch_tokens, o.max_batch_size), overlap)
        for pack, outcomes in self.model.embed_batches(packs, o.multivector):
            for row, outcome in zip(pack, self._outcomes(pack, outcomes), strict=True):
                position = row.index
                if isinstance(outcome, Exception):
                    results[position] = {"position": position, "id": ids[position],
                                         "error": f"item {position}: {type(outcome).__name__}: {outcome}"}
                else:
                    results[position] = {"position": position, "id": ids[position], "vector": outcome}
        return [results[record["position"]] for record in records]

    def _prepared_row(self, record: dict):
        """A record's row for the model: tokenized here, or rebuilt from `prepare_records`' fields and routed by
        this model (an adapter it does not hold is this row's error; a task adapter the checkpoint did not ship
        runs on the base model, exactly as when the row is tokenized here)."""
        o = self.options
        processor = self.model.processor
        if "prepared" not in record:
            return processor.prepare_item(record["item"], index=record["position"], max_pixels=o.max_pixels,
                                          max_length=o.max_length, prompt_set=o.prompt_set)
        route = processor.resolve_item(record["item"], index=record["position"], prompt_set=o.prompt_set)
        return processor.item_from_fields({**record["prepared"], "adapter": route.adapter})

    def _outcomes(self, pack: list, outcomes: list | Exception) -> list:
        """Per row: its vector as an array, or its error. A pack whose forward failed is retried row by row, so
        a bad row costs only itself."""
        if not isinstance(outcomes, Exception):
            return [self._array(outcome) for outcome in outcomes]
        if len(pack) == 1:
            return [outcomes]
        alone: list = []
        for row in pack:
            try:
                (outcome,) = self.model.embed_prepared([row], self.options.multivector)
            except Exception as exc:  # noqa: BLE001 - this row's own failure
                outcome = exc
            alone.append(self._array(outcome))
        return alone

    def _array(self, vector) -> np.ndarray | Exception:
        if isinstance(vector, Exception):  # this row's own error (a non-finite vector, a failed forward)
            return vector
        o = self.options
        if not o.multivector and o.dimensions is not None:
            vector = self.model.truncate(vector, o.dimensions)
        array = vector.detach().to("cpu").float().numpy()
        return array if np.isfinite(array).all() else ValueError("the embedding has non-finite values")


def _torch_dtype(name: str | None):
    if name in (None, "auto"):
        return None
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]

