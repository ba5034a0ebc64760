"""NovaEmbeddingsV1Config: the Qwen2.5-VL backbone config plus Jina V4's embedding fields and Nova's routing.

Task routing (which adapter and which trained prefix a task uses) lives here, in `config.json`, so a model
repository can change it without code changes.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig

# Jina V4's trained prefixes: the default prompt set.
DEFAULT_TASK_ROUTING = {
    "retrieval": {"adapter": "retrieval", "prompt": "Query: "},
    "retrieval.query": {"adapter": "retrieval", "prompt": "Query: "},
    "retrieval.passage": {"adapter": "retrieval", "prompt": "Passage: "},
    "text-matching": {"adapter": "text-matching", "prompt": "Query: "},
    "code": {"adapter": "code", "prompt": "Query: "},
    "code.query": {"adapter": "code", "prompt": "Query: "},
    "code.passage": {"adapter": "code", "prompt": "Passage: "},
}

# The model card's descriptive prompts: selectable with `prompt_set="descriptive"`, never the default,
# because they move embeddings away from the distribution the adapters were trained on.
DESCRIPTIVE_PROMPTS = {
    "retrieval": "Represent this query for retrieving relevant documents: ",
    "retrieval.query": "Represent this query for retrieving relevant documents: ",
    "retrieval.passage": "Represent this document for retrieval: ",
    "text-matching": "Represent this text for finding semantically similar texts: ",
    "code": "Represent this query for retrieving relevant code: ",
    "code.query": "Represent this query for retrieving relevant code: ",
    "code.passage": "Represent this code snippet for retrieval: ",
}


class NovaEmbeddingsV1Config(Qwen2_5_VLConfig):
    model_type = "nova_embeddings_v1"

    def __init__(
        self,
        task_names: list[str] | None = None,
        task_routing: dict | None = None,
        prompt_sets: dict | None = None,
        default_task: str = "retrieval",
        matryoshka_dims: list[int] | None = None,
        multi_vector_projector_dim: int = 128,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        max_image_pixels: int = 40_000_000,
        nova_random_weights: bool = False,
        **kwargs,
    ):
        self.task_names = list(task_names or ["retrieval", "text-matching", "code"])
        self.task_routing = dict(task_routing or DEFAULT_TASK_ROUTING)
        self.prompt_sets = dict(prompt_sets or {"descriptive": DESCRIPTIVE_PROMPTS})
        self.default_task = default_task
        self.matryoshka_dims = list(matryoshka_dims or [128, 256, 512, 1024, 2048])
        self.multi_vector_projector_dim = multi_vector_projector_dim
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_image_pixels = max_image_pixels
        # True only for generated test checkpoints; shown by the server banner and the playground.
        self.nova_random_weights = nova_random_weights
        super().__init__(**kwargs)


__all__ = ["NovaEmbeddingsV1Config", "DEFAULT_TASK_ROUTING", "DESCRIPTIVE_PROMPTS"]
