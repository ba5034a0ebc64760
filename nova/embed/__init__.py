"""`nova embed`: a corpus (JSONL, Parquet or a BEIR folder) in, Parquet vectors out.

One module per job:
- `inputs`: which rows the input holds and how it is cut into shards (the unit of resume and commit).
- `stages`: the work on rows, shared by both runners: `load_items` (read images, apply defaults),
  `prepare_records` (tokenize without the model: Ray's load stage) and `ModelWorker` (the model's
  `prepare_item` where rows come untokenized, then token-budget packs through `embed_batches`, the server's path).
- `output`: the output folder: settings manifest (refuses to mix settings), atomic per-shard commit of
  Parquet parts and their errors, the summary.
- `local`: the single-process runner (no Ray needed).
- `ray_pipeline`: the Ray Data runner (read, load, model stages; an actor pool for the model).
- `cli`: the command line.
"""
