"""Nova Embeddings V1 playground: same query, different instructions, different results.

Start it with `python app.py [MODEL]` (the Hugging Face Spaces entry point) or `nova playground [MODEL]`.
MODEL is a Nova or Jina V4 directory or hub id; without one the bundled tiny random-weight checkpoint is
used. With `--server URL` (or NOVA_PLAYGROUND_SERVER) embeddings come from a running `nova serve`
through its `/v1/embeddings` API instead. See docs/playground.md.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

if importlib.util.find_spec("gradio") is None:  # lets `nova playground` name the missing extra
    raise ImportError("gradio is not installed: pip install 'nova-embeddings[app]'")

log = logging.getLogger("nova.playground")
MAX_VARIANTS = 3
VARIANT_NAMES = ["Variant A", "Variant B", "Variant C"]
SCORING_CHOICES = ["pooled (cosine)", "multi-vector (MaxSim)"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("model", nargs="?", default=env("NOVA_PLAYGROUND_MODEL") or None,
                        help="Nova/Jina V4 directory or hub id (default: the tiny random-weight checkpoint; "
                             "env NOVA_PLAYGROUND_MODEL)")
    parser.add_argument("--server", default=env("NOVA_PLAYGROUND_SERVER") or None, metavar="URL",
                        help="use a running `nova serve` at URL instead of an in-process model "
                             "(env NOVA_PLAYGROUND_SERVER)")
    parser.add_argument("--api-key", default=env("NOVA_API_KEY") or None, help="server API key (env NOVA_API_KEY)")
    parser.add_argument("--admin-api-key", default=env("NOVA_ADMIN_API_KEY") or None,
                        help="server admin key, to list/load adapters (env NOVA_ADMIN_API_KEY)")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="address to listen on (default 127.0.0.1; Spaces sets GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--adapter-root", default=env("NOVA_PLAYGROUND_ADAPTER_ROOT") or None, metavar="DIR",
                        help="allow loading PEFT adapter folders under DIR at run time (in-process model; default: "
                             "off, as a public Space should be; env NOVA_PLAYGROUND_ADAPTER_ROOT). Against a server, "
                             "loading needs --admin-api-key and the server's own --lora-root")
    parser.add_argument("--device", default=None, help="in-process model device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="in-process model dtype (default: the model's choice)")


def make_backend(args: argparse.Namespace):
    from nova.playground.backends import InProcessBackend, ServerBackend

    if args.server:
        return ServerBackend(args.server, api_key=args.api_key, admin_api_key=args.admin_api_key, model=args.model)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return InProcessBackend.load(args.model, device=device, dtype=args.dtype,
                                 adapter_root=getattr(args, "adapter_root", None))


def build_demo(backend):  # noqa: C901 - one function that lays out the page and wires its events
    import gradio as gr

    from nova.playground import views
    from nova.playground.backends import PlaygroundError, ServerBackend
    from nova.playground.compare import (
        AUTO,
        NO_ADAPTER,
        SAME_AS_BASELINE,
        CachedEncoder,
        Settings,
        Variant,
        compare_scorings,
        parse_candidates,
        run_comparison,
        token_pair,
    )
    from nova.playground.examples import EXAMPLES
    from nova.playground.scoring import best_matches, maxsim

    encoder = CachedEncoder(backend)
    startup_error = None
    try:
        dims = backend.dimension_choices()
    except PlaygroundError as exc:
        startup_error, dims = str(exc), [128, 256, 512, 1024, 2048]
    dim_choices = ["full"] + [str(d) for d in dims[:-1]]

    def adapter_choices() -> list[str]:
        try:
            return [AUTO, NO_ADAPTER] + backend.list_adapters()
        except PlaygroundError:
            return [AUTO, NO_ADAPTER]

    adapters_at_start = adapter_choices()
    first = EXAMPLES[0]
    tasks = backend.tasks()

    with gr.Blocks(title="Nova Embeddings V1 playground", analytics_enabled=False) as demo:
        gr.Markdown("# Nova Embeddings V1 playground\nSame query, different instructions, different results.")
        banner = gr.Markdown(
            views.banner_markdown(backend.label, backend.random_weights, isinstance(backend, ServerBackend), startup_error),
            elem_id="nova-banner",
        )
        with gr.Row():
            example_buttons = [gr.Button(f"Example: {ex.name}", size="sm", elem_id=f"nova-example-{i}")
                               for i, ex in enumerate(EXAMPLES)]
        with gr.Row():
            with gr.Column(scale=3):
                query = gr.Textbox(label="Query", value=first.query, lines=2, elem_id="nova-query")
                candidates_text = gr.Textbox(
                    label="Candidates: text or code, separated by a line containing only ---",
                    value=first.candidates_text, lines=10, max_lines=30, elem_id="nova-candidates")
                images = gr.File(label="Image candidates (optional)", file_count="multiple", file_types=["image"],
                                 type="filepath", elem_id="nova-images")
            with gr.Column(scale=2):
                variant_boxes, variant_adapters = [], []
                for i, name in enumerate(VARIANT_NAMES):
                    with gr.Group():
                        variant_boxes.append(gr.Textbox(
                            label=f"{name}: instructions", value=first.variants[i], lines=2,
                            placeholder="e.g. Retrieve the statute that answers the question (empty: variant off)",
                            elem_id=f"nova-variant-{i}"))
                        variant_adapters.append(gr.Dropdown(
                            [SAME_AS_BASELINE] + adapters_at_start, value=SAME_AS_BASELINE,
                            label=f"{name}: adapter", elem_id=f"nova-variant-adapter-{i}"))
        with gr.Row():
            query_task = gr.Dropdown(tasks, value="retrieval.query", label="Query task", elem_id="nova-query-task")
            passage_task = gr.Dropdown(tasks, value="retrieval.passage", label="Candidate task",
                                       elem_id="nova-passage-task")
            adapter = gr.Dropdown(adapters_at_start, value=AUTO, label="Baseline adapter", elem_id="nova-adapter")
            scoring = gr.Radio(SCORING_CHOICES, value=SCORING_CHOICES[0], label="Scoring", elem_id="nova-scoring")
            dimension = gr.Dropdown(dim_choices, value="full", label="Matryoshka dimension (pooled only)",
                                    elem_id="nova-dimension")
            instruct_candidates = gr.Checkbox(False, label="Instructions on candidates too",
                                              elem_id="nova-instruct-candidates")
        with gr.Accordion("Adapters loaded at run time", open=False, elem_id="nova-adapters-accordion"):
            gr.Markdown(views.adapter_loading_note(backend), elem_id="nova-lora-note")
            with gr.Row():
                lora_name = gr.Textbox(label="Adapter name", scale=1, elem_id="nova-lora-name",
                                       interactive=backend.can_load_adapters)
                lora_path = gr.Textbox(label="PEFT folder (or its adapter_model.safetensors) under the adapter root",
                                       scale=3, elem_id="nova-lora-path", interactive=backend.can_load_adapters)
                load_button = gr.Button("Load adapter", scale=1, elem_id="nova-lora-load",
                                        interactive=backend.can_load_adapters)
                unload_button = gr.Button("Unload adapter", scale=1, elem_id="nova-lora-unload",
                                          interactive=backend.can_load_adapters)
                refresh_button = gr.Button("Refresh adapter list", scale=1, elem_id="nova-lora-refresh")
        run_button = gr.Button("Compare", variant="primary", elem_id="nova-run")
        status = gr.Markdown("", elem_id="nova-status")

        panels = []
        with gr.Row(equal_height=False):
            for slot in range(MAX_VARIANTS + 1):
                with gr.Column(visible=False, min_width=280, elem_id=f"nova-panel-{slot}") as column:
                    title = gr.Markdown()
                    ranking = gr.HTML(elem_id=f"nova-ranking-{slot}")
                    plot = gr.Plot(label="query × candidate similarity", elem_id=f"nova-heatmap-{slot}",
                                   format="png")
                panels.append((column, title, ranking, plot))

        with gr.Accordion("Multi-vector token view", open=True):
            gr.Markdown("For one query/candidate pair: which candidate token each query token matched best "
                        "(multi-vector embeddings, whatever the scoring above).")
            with gr.Row():
                token_variant = gr.Dropdown([], label="Variant", elem_id="nova-token-variant")
                token_candidate = gr.Dropdown([], label="Candidate", elem_id="nova-token-candidate")
            token_html = gr.HTML(elem_id="nova-token-view")

        with gr.Accordion("Late interaction vs pooled cosine", open=False, elem_id="nova-scorings-accordion"):
            gr.Markdown("The query against the candidates (passages or page images) under the baseline settings "
                        "(no instructions), ranked by pooled cosine and by late interaction (MaxSim over "
                        "multi-vectors) side by side.")
            scorings_button = gr.Button("Rank both ways", elem_id="nova-scorings-run")
            scorings_html = gr.HTML(elem_id="nova-scorings")

        state = gr.State(None)

        # ---- handlers ---------------------------------------------------------------------------------
        def settings_from(q_task, p_task, base_adapter, scoring_choice, dim, instruct) -> Settings:
            return Settings(query_task=q_task, passage_task=p_task, adapter=base_adapter or AUTO,
                            multivector=scoring_choice == SCORING_CHOICES[1],
                            dimensions=None if dim in (None, "", "full") else int(dim),
                            instruct_candidates=bool(instruct))

        def empty_outputs(message: str):
            hidden = []
            for _ in panels:
                hidden += [gr.update(visible=False), "", "", None]
            return [message, *hidden, None, gr.update(choices=[], value=None), gr.update(choices=[], value=None), ""]

        def failure_html(exc: Exception) -> str:
            """Bad input: its message. A bug or a model failure: a message here, the traceback in the log."""
            if isinstance(exc, PlaygroundError):
                message = str(exc)
            else:
                log.exception("embedding failed")
                message = f"Something went wrong while embedding ({type(exc).__name__}: {exc}); see the server log."
            gr.Warning(message)
            return f'<div class="nova-error">⚠️ {html.escape(message)}</div>'

        def rank_both_ways(q, cands, files, *rest):
            try:
                return views.scorings_html(compare_scorings(encoder, q, parse_candidates(cands, files),
                                                            settings_from(*rest)))
            except Exception as exc:  # noqa: BLE001 - failure_html tells bad input from a bug
                return failure_html(exc)

        def token_view(comparison, variant_index: int, candidate_index: int) -> str:
            result, q_vec, c_vec, q_item, c_item = token_pair(encoder, comparison, variant_index, candidate_index)
            q_labels = backend.token_labels(q_item, len(q_vec)) or [f"q{i}" for i in range(len(q_vec))]
            c_labels = backend.token_labels(c_item, len(c_vec)) or [f"t{j}" for j in range(len(c_vec))]
            candidate = comparison.candidates[candidate_index]
            name = f"{candidate.label} ({candidate.preview}) under {views.variant_title(result, variant_index).splitlines()[0][4:]}"
            return views.token_view_html(q_labels, c_labels, best_matches(q_vec, c_vec), name, maxsim(q_vec, c_vec),
                                         image_bytes=candidate.image)

        def compare(q, cands, files, *rest):
            boxes, adapters_ = rest[:MAX_VARIANTS], rest[MAX_VARIANTS: 2 * MAX_VARIANTS]
            settings = settings_from(*rest[2 * MAX_VARIANTS:])
            try:
                candidates = parse_candidates(cands, files)
                variants = [Variant(name, box, ad) for name, box, ad in zip(VARIANT_NAMES, boxes, adapters_, strict=True)]
                comparison = run_comparison(encoder, q, candidates, variants, settings)
            except Exception as exc:  # noqa: BLE001 - failure_html tells bad input from a bug
                return empty_outputs(failure_html(exc))
            limits = views.shared_limits(comparison)
            outputs = []
            for slot in range(len(panels)):
                if slot >= len(comparison.results):
                    outputs += [gr.update(visible=False), "", "", None]
                    continue
                result = comparison.results[slot]
                q_labels = backend.token_labels(result.query_item, len(result.query_vector)) if settings.multivector else None
                outputs += [gr.update(visible=True), views.variant_title(result, slot),
                            views.ranking_html(comparison, slot), views.heatmap_figure(comparison, slot, q_labels, limits)]
            variant_names = ["Baseline" if i == 0 else r.variant.name for i, r in enumerate(comparison.results)]
            pick = 1 if len(comparison.results) > 1 else 0
            top = comparison.results[pick].ranks.index(1)
            try:
                tokens = token_view(comparison, pick, top)
            except Exception as exc:  # noqa: BLE001 - the rankings stand even if the token view fails
                log.exception("token view failed")
                tokens = f"⚠️ {html.escape(str(exc))}"
            metric = views.score_name(settings.multivector)
            dims = "" if settings.multivector else f", {settings.dimensions or 'full'} dimensions"
            message = (f"Compared {len(candidates)} candidates under {len(comparison.results)} settings "
                       f"({metric}{dims}).")
            return [message, *outputs, comparison,
                    gr.update(choices=[(n, i) for i, n in enumerate(variant_names)], value=pick),
                    gr.update(choices=[(f"{c.label}: {c.preview}", i) for i, c in enumerate(candidates)], value=top),
                    tokens]

        def update_tokens(comparison, variant_index, candidate_index):
            if comparison is None or variant_index is None or candidate_index is None:
                return ""
            try:
                return token_view(comparison, int(variant_index), int(candidate_index))
            except Exception as exc:  # noqa: BLE001 - a message in the panel, the traceback in the log
                log.exception("token view failed")
                return f"⚠️ {html.escape(str(exc))}"

        def refresh_adapters():
            choices = adapter_choices()
            return [gr.update(choices=choices)] + [gr.update(choices=[SAME_AS_BASELINE] + choices)] * MAX_VARIANTS

        def load_adapter(name, path):
            name, path = (name or "").strip(), (path or "").strip()
            if not name or not path:
                gr.Warning("Give both an adapter name and the path of its PEFT folder.")
                return ["⚠️ Give both an adapter name and the path of its PEFT folder.", *refresh_adapters()]
            try:
                backend.load_adapter(name, path)
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return [f"⚠️ {html.escape(str(exc))}", *refresh_adapters()]
            return [f"Loaded adapter `{name}`; pick it in an adapter menu.", *refresh_adapters()]

        def unload_adapter(name):
            name = (name or "").strip()
            try:
                backend.unload_adapter(name)
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return [f"⚠️ {html.escape(str(exc))}", *refresh_adapters()]
            return [f"Unloaded adapter `{name}`.", *refresh_adapters()]

        inputs = [query, candidates_text, images, *variant_boxes, *variant_adapters,
                  query_task, passage_task, adapter, scoring, dimension, instruct_candidates]
        outputs = [status] + [c for panel in panels for c in panel] + [state, token_variant, token_candidate, token_html]
        run_button.click(compare, inputs, outputs, concurrency_limit=2)
        scorings_button.click(rank_both_ways, [query, candidates_text, images, query_task, passage_task, adapter,
                                               scoring, dimension, instruct_candidates], scorings_html,
                              concurrency_limit=2)
        for button, example in zip(example_buttons, EXAMPLES, strict=True):
            def fill(example=example):
                return [example.query, example.candidates_text, example.image_paths or None, *example.variants,
                        example.query_task, example.passage_task]
            button.click(fill, None, [query, candidates_text, images, *variant_boxes, query_task, passage_task]
                         ).then(compare, inputs, outputs, concurrency_limit=2)
        token_variant.input(update_tokens, [state, token_variant, token_candidate], token_html)
        token_candidate.input(update_tokens, [state, token_variant, token_candidate], token_html)
        refresh_button.click(refresh_adapters, None, [adapter, *variant_adapters])
        load_button.click(load_adapter, [lora_name, lora_path], [status, adapter, *variant_adapters])
        unload_button.click(unload_adapter, [lora_name], [status, adapter, *variant_adapters])
        def refresh_banner():
            error = backend.refresh()
            return views.banner_markdown(backend.label, backend.random_weights, isinstance(backend, ServerBackend), error)

        demo.load(refresh_banner, None, banner)
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    import gradio as gr

    from nova.playground import views
    from nova.playground.examples import ASSETS

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: nothing leaves the machine
    return demo.queue(default_concurrency_limit=2).launch(
        server_name=host, server_port=port, share=False, show_error=False, prevent_thread_lock=not block,
        allowed_paths=[str(ASSETS)], theme=theme, css=views.CSS, ssr_mode=False, quiet=not block,
    )


def run(args: argparse.Namespace) -> int:
    backend = make_backend(args)
    demo = build_demo(backend)
    print(f"Nova playground: {backend.label} on http://{args.host}:{args.port}", flush=True)
    launch(demo, host=args.host, port=args.port, block=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="app.py", description="Nova Embeddings V1 playground (Gradio)")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
