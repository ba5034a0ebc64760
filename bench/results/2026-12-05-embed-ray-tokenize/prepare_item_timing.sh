# prepare_item of one photo-like image, decoded and fitted to the model (fit_image), 10 calls each: the mean.
cd "$(git rev-parse --show-toplevel)" && .venv/bin/python - <<'PY'
import sys, time
sys.path.insert(0, "bench")
from bench_encode_ahead import photo
from nova.loading import load_processor
p = load_processor(None)
for w, h in ((448, 448), (2000, 1500), (4000, 3000)):
    image = photo(w, h)
    fitted = p.fit_image(image)
    for name, source in (("decoded", image), ("fitted", fitted)):
        p.prepare_item({"image": source}, index=0)
        start = time.perf_counter()
        for _ in range(10):
            p.prepare_item({"image": source}, index=0)
        print(f"{w}x{h} {name} ({source.width}x{source.height}): prepare_item {(time.perf_counter() - start) / 10 * 1e3:.1f} ms")
PY
