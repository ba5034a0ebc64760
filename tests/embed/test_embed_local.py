"""`nova embed` in one process (--no-ray, or Ray not installed): same output format, resume, settings guard."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq


def test_one_process_equals_encode_and_reports_bad_rows(run_cli, embed_corpus, embed_reference, check_embed_output,
                                                        tmp_path):
    path, _, bad = embed_corpus
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("embed", path, out, "--no-ray", "--shard-rows", "300", "--no-progress")
    assert code == 0, stderr
    check_embed_output(out, embed_reference, bad)
    assert "1000 rows embedded, 5 in error" in stdout and "rows/s" in stdout
    metadata = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[b"nova.embed"])
    assert metadata["model"]["random_weights"] is True and metadata["options"]["multivector"] is False


def test_without_ray_installed_runs_in_one_process_and_says_how_to_get_ray(run_cli, embed_corpus, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    small = tmp_path / "small.jsonl"
    small.write_text("".join(line + "\n" for line in embed_corpus[0].read_text().splitlines()[:30]))
    code, stdout, stderr = run_cli("embed", small, tmp_path / "out", "--no-progress")
    assert code == 0, stderr
    assert "pip install 'nova-embeddings[ray]'" in stderr and "one process" in stdout
    assert pq.read_table(tmp_path / "out").num_rows > 0


def test_resume_skips_committed_parts_and_other_settings_refuse(run_cli, embed_corpus, embed_reference,
                                                                check_embed_output, tmp_path):
    path, _, bad = embed_corpus
    out = tmp_path / "out"
    assert run_cli("embed", path, out, "--no-ray", "--shard-rows", "250", "--no-progress")[0] == 0
    # an interrupted run: parts 1 and 3 never committed (a temporary file is left behind, as after a crash)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    for name in ("part-00001.parquet", "part-00003.parquet"):
        shutil.move(out / name, out / f".{name}.tmp")
        kept.pop(name)
    code, stdout, stderr = run_cli("embed", path, out, "--no-ray", "--shard-rows", "250", "--no-progress", "--resume")
    assert code == 0, stderr
    assert "resuming: 3 of 5" in stderr and "this run: 500 rows" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in kept} == kept
    check_embed_output(out, embed_reference, bad)

    code, _, stderr = run_cli("embed", path, out, "--no-ray", "--shard-rows", "250", "--dimensions", "32", "--resume")
    assert code == 2 and "other settings" in stderr and "options.dimensions" in stderr
    assert "use another folder, or --overwrite to start over" in stderr
    code, _, stderr = run_cli("embed", path, out, "--no-ray", "--shard-rows", "250", "--instructions", "x", "--resume")
    assert code == 2 and "defaults.instructions" in stderr


def test_multivector_output_equals_encode(run_cli, tiny_model, embed_corpus, tmp_path):
    path, good, _ = embed_corpus
    small = tmp_path / "small.jsonl"
    lines = [line for line in path.read_text().splitlines()[:60] if '"id": "doc-' in line]
    small.write_text("\n".join(lines) + "\n")
    for k in range(3):
        shutil.copy(path.parent / f"img{k}.png", tmp_path / f"img{k}.png")
    code, _, stderr = run_cli("embed", small, tmp_path / "out", "--no-ray", "--multivector", "--no-progress")
    assert code == 0, stderr
    table = pq.read_table(tmp_path / "out")
    assert str(table.schema.field("multivector").type) == "list<element: fixed_size_list<element: float>[128]>"
    ids = table.column("id").to_pylist()
    expected = tiny_model.encode([good[i] for i in ids], return_multivector=True, return_numpy=True)
    for got, want in zip(table.column("multivector").to_pylist(), expected, strict=True):
        got = np.asarray(got, dtype=np.float32)
        assert got.shape == want.shape
        assert ((got * want).sum(1)).min() >= 0.9999


def test_parquet_with_image_bytes_and_beir_folder(run_cli, tiny_model, image, tmp_path):
    import io

    import pyarrow as pa

    png = io.BytesIO()
    image.save(png, format="PNG")
    rows = [{"id": "t", "text": "plain text", "image": None, "task": "retrieval.passage"},
            {"id": "i", "text": None, "image": png.getvalue(), "task": None},
            {"id": "junk", "text": None, "image": b"not an image", "task": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    code, _, stderr = run_cli("embed", tmp_path / "in.parquet", tmp_path / "out", "--no-ray", "--no-progress",
                              "--instructions", "Find the picture.")
    assert code == 0, stderr
    table = pq.read_table(tmp_path / "out")
    got = dict(zip(table.column("id").to_pylist(), np.asarray(table.column("embedding").to_pylist()), strict=True))
    want = tiny_model.encode([{"text": "plain text", "task": "retrieval.passage"}, {"image": image}],
                             instructions="Find the picture.", return_numpy=True)
    assert set(got) == {"t", "i"}
    for key, vector in zip(("t", "i"), want, strict=True):
        assert float(got[key] @ vector) >= 0.9999
    errors = (tmp_path / "out" / "_errors.jsonl").read_text()
    assert '"id": "junk"' in errors and "not a supported image" in errors

    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "Title", "text": "body text"}) + "\n")
    code, _, stderr = run_cli("embed", beir, tmp_path / "beir-out", "--no-ray", "--task", "retrieval.passage")
    assert code == 0, stderr
    table = pq.read_table(tmp_path / "beir-out")
    want = tiny_model.encode([{"text": "Title body text", "task": "retrieval.passage"}], return_numpy=True)[0]
    assert table.column("id").to_pylist() == ["d1"]
    assert float(np.asarray(table.column("embedding").to_pylist()[0]) @ want) >= 0.9999


def test_embed_worker_flags_without_ray_are_refused(run_cli, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n')
    code, _, stderr = run_cli("embed", corpus, tmp_path / "out", "--no-ray", "--workers", "2")
    assert code == 2 and "need Ray" in stderr


def test_a_pack_whose_forward_failed_is_retried_row_by_row(fresh_model):
    """A pack's forward can fail for all its rows (out of memory on a GPU) or for one row's sake: each row is
    then run alone, so only a row that fails alone gets an error."""
    from nova.embed.stages import EmbedOptions, ModelWorker

    worker = ModelWorker(None, EmbedOptions(dimensions=16), model=fresh_model)
    rows = [fresh_model.processor.prepare_item({"text": f"row {i}", **fields}, index=i)
            for i, fields in enumerate([{}, {"adapter": "code"}, {"task": "retrieval.passage"}])]
    fresh_model.unload_adapter("code")  # after its row was prepared: the pack's forward fails
    ((pack, failure),) = fresh_model.embed_batches([rows])
    assert isinstance(failure, ValueError)
    got = worker._outcomes(pack, failure)
    assert isinstance(got[1], ValueError) and "item 1: adapter 'code' is not loaded" in str(got[1])
    for i in (0, 2):
        want = fresh_model.truncate(fresh_model.embed_prepared([rows[i]])[0], 16).numpy()
        assert got[i].shape == (16,) and np.allclose(got[i], want, atol=1e-6)


def test_on_a_gpu_records_are_prepared_between_launches(fresh_model, monkeypatch, record_preparing_and_launching):
    """Where launches return before their forwards end (a GPU), the first pack is launched once a few records
    are prepared and the next window of records is prepared a share at a time between launches, so the
    device is not idle while the host tokenizes; a window whose records all failed passes straight on."""
    from nova.embed.stages import EmbedOptions, ModelWorker

    model = fresh_model
    monkeypatch.setattr(type(model), "launches_ahead", True)  # the scheduling a GPU gets, on this CPU
    seen = record_preparing_and_launching(model)
    records = [{"position": i, "id": f"r{i}", "error": "unreadable"} for i in range(2)]
    records += [{"position": i, "id": f"r{i}", "item": {"text": "word " * (i % 5 + 1)}} for i in range(2, 66)]
    got = ModelWorker(None, EmbedOptions(max_batch_size=2), model=model).embed(records)
    # windows of 2 (both failed: the next is prepared at once), 4, 8, 16, 32 and the last 4 records
    assert "".join(seen) == "PPPP" + "LPPPP" * (2 + 4 + 8) + "LP" * 4 + "L" * 12 + "LL"
    assert [r.get("error") for r in got[:2]] == ["unreadable"] * 2 and [r["id"] for r in got] == [f"r{i}" for i in range(66)]
    want = model.encode([r["item"] for r in records[2:]], return_numpy=True)
    assert all(np.allclose(r["vector"], w, atol=1e-5) for r, w in zip(got[2:], want, strict=True))


def test_records_tokenized_without_the_model_embed_as_records_tokenized_by_it(fresh_model, tiny_dir, image,
                                                                             make_image, monkeypatch):
    """Ray's load stage tokenizes text rows with a processor of its own (`load_processor`: no weights, routing by
    the config); the model's stage then only routes, packs and embeds them: same vectors, same errors, including an
    adapter the model does not hold (caught by the model's routing) and a task adapter it did not ship (its base
    model). Image rows pass on resized to the model's input size and are patchified by the model's stage."""
    from nova.embed.stages import EmbedOptions, ModelWorker, prepare_records
    from nova.loading import load_processor

    model = fresh_model
    model.unload_adapter("code")
    model.processor.absent_task_adapters = frozenset({"code"})  # as if the checkpoint shipped no weights for it
    items = [{"text": "rivers and their deltas"}, {"text": "def f(): pass", "task": "code"},
             {"text": "same words", "instructions": "Find notes on rivers."}, {"text": "x", "adapter": "code"},
             {"text": "y", "adapter": "nope"}, {"text": "", "task": "retrieval.passage"}, {"text": "z", "task": "nope"},
             {"text": "a caption", "image": image, "adapter": "none"}, {"image": make_image(2010, 10)}]
    records = [{"position": i, "id": f"r{i}", "item": item} for i, item in enumerate(items)]
    options = EmbedOptions(max_batch_size=3, dimensions=32, max_length=64)
    here = ModelWorker(None, options, model=model).embed(records)

    prepared = prepare_records(records, load_processor(str(tiny_dir)), options)
    assert [sorted(r) for r in prepared[:2]] == [["id", "item", "position", "prepared"]] * 2
    fitted = prepared[7]["item"]["image"]  # an image row passes on untokenized, its image fitted to the model
    assert "prepared" not in prepared[7] and image.size == (120, 80) and fitted.size == (112, 84)
    assert "unknown task 'nope'" in prepared[6]["error"] and "'text' is empty" in prepared[5]["error"]
    tokenized_by_the_model = []
    prepare_item = type(model.processor).prepare_item

    def counted_prepare_item(processor, item, **kwargs):
        tokenized_by_the_model.append(kwargs["index"])
        return prepare_item(processor, item, **kwargs)

    monkeypatch.setattr(type(model.processor), "prepare_item", counted_prepare_item)
    there = ModelWorker(None, options, model=model).embed(prepared)
    assert tokenized_by_the_model == [7, 8]  # the image rows (one the size rule refuses: as in one process)

    assert [sorted(r) for r in there] == [sorted(r) for r in here]
    for a, b in zip(here, there, strict=True):
        assert a.get("error") == b.get("error")
        if "vector" in a:
            assert a["vector"].shape == (32,) and np.allclose(a["vector"], b["vector"], atol=1e-6)
    errors = {r["position"]: r["error"] for r in there if "error" in r}
    assert sorted(errors) == [3, 4, 5, 6, 8] and "aspect ratio" in errors[8]
    assert "adapter 'code'" in errors[3] and "unknown adapter 'nope'" in errors[4]
    assert "vector" in there[1]  # task 'code' inherits its absent adapter: the base model, as when tokenized here
