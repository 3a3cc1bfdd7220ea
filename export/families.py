"""The model families the exporter supports: data, not subclasses.

Each family is the transformers `model_type`s it covers and the few choices that make its export work:
which torch exporter traces it (TorchScript where it works, torch.export/dynamo where the TorchScript
tracer fails on the model's mask code) and which attention implementation is loaded (always "eager":
plain MatMul/Softmax ops whose rows onnxruntime computes independently of the batch; fused attention
kernels are not traced). `family_for` is the one place that decides; an unknown architecture is refused
with the supported ones named.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    exporter: str  # the default torch exporter: "torchscript" | "dynamo"
    positions: str  # for the manifest and the README table
    attention: str


FAMILIES: tuple[Family, ...] = (
    Family("BERT", ("bert",), "torchscript", "absolute (learned)", "bidirectional"),
    Family("RoBERTa", ("roberta", "camembert"), "torchscript", "absolute (learned, offset by pad id)",
           "bidirectional"),
    Family("XLM-RoBERTa", ("xlm-roberta",), "torchscript", "absolute (learned, offset by pad id)", "bidirectional"),
    Family("MPNet", ("mpnet",), "torchscript", "relative buckets + absolute", "bidirectional"),
    Family("DistilBERT", ("distilbert",), "torchscript", "absolute (learned)", "bidirectional"),
    Family("ELECTRA", ("electra",), "torchscript", "absolute (learned)", "bidirectional"),
    Family("Qwen3", ("qwen3",), "torchscript", "rotary", "causal, grouped-query"),
    Family("Qwen2", ("qwen2",), "torchscript", "rotary", "causal, grouped-query"),
    # TorchScript's ONNX pass fails on Gemma3's mask code (RuntimeError `unordered_map::at`): torch.export
    Family("Gemma3 (text)", ("gemma3_text",), "dynamo", "rotary (local and global bases)",
           "bidirectional (use_bidirectional_attention) or causal, sliding-window and global layers, "
           "grouped-query"),
    Family("ModernBERT", ("modernbert",), "torchscript", "rotary (local and global bases)",
           "bidirectional, alternating sliding-window and global layers"),
)
CUSTOM_CODE = Family("custom code (trust_remote_code)", (), "torchscript", "model's own code", "model's own code")


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def needs_remote_code(config: dict) -> bool:
    """True when the folder's config maps AutoModel to modeling code shipped with the model."""
    auto_map = config.get("auto_map") or {}
    return "AutoModel" in auto_map


def family_for(config: dict, trust_remote_code: bool = False, where: str = "config.json") -> Family:
    """The family of a transformers config; ValueError naming the architecture and the supported ones."""
    model_type = config.get("model_type")
    arch = ", ".join(config.get("architectures") or []) or "no architectures listed"
    if needs_remote_code(config):
        if not trust_remote_code:
            raise ValueError(
                f"{where}: model_type {model_type!r} ({arch}) runs modeling code shipped with the model "
                f"(auto_map {config['auto_map']['AutoModel']!r}); pass trust_remote_code=True "
                f"(--trust-remote-code) to export it with that code, read from the model folder only")
        return CUSTOM_CODE
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(f"{where}: architecture {model_type!r} ({arch}) is not supported; supported model types: "
                     f"{', '.join(supported_model_types())} (or a model with its own code via trust_remote_code)")


# Rotary scalings whose frequencies transformers picks with a Python branch on the text's length: a graph
# traced once (on a short example) keeps the short-text frequencies for every length.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _rope_specs(config: dict) -> list[dict]:
    """Every rotary scaling spec of a config: `rope_scaling` (transformers 4) and `rope_parameters`
    (transformers 5), each either one spec or one per layer type (Gemma3: full and sliding attention)."""
    specs = []
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if not isinstance(value, dict):
            continue
        if any(k in value for k in ("rope_type", "type")):
            specs.append(value)
        else:
            specs.extend(v for v in value.values() if isinstance(v, dict))
    return specs


def check_positions(config: dict, family: Family, max_length: int, where: str = "config.json") -> None:
    """ValueError for position settings the export cannot serve at `max_length`: a learned table too short
    (texts that long would fail inside onnxruntime), or one the traced graph would silently get wrong."""
    from .source import position_limit

    limit = position_limit(config)
    if "absolute" in family.positions and max_length > limit:  # a learned table has no row beyond it
        raise ValueError(f"max_length {max_length} is beyond the {limit} positions of {where} "
                         f"(max_position_embeddings); pass max_length (--max-length) <= {limit}")
    if "rotary" in family.positions:
        for spec in _rope_specs(config):
            kind = spec.get("rope_type") or spec.get("type")
            if kind == "longrope":
                raise ValueError(f"{where}: rope type 'longrope' is not supported (its frequencies switch with "
                                 f"the text's length, which a traced graph cannot follow)")
            limit = config.get("max_position_embeddings")
            if kind == "dynamic" and limit and max_length > int(limit):
                raise ValueError(f"{where}: rope type 'dynamic' rescales its frequencies for texts longer than "
                                 f"max_position_embeddings ({limit} tokens), which a traced graph cannot follow; "
                                 f"pass max_length (--max-length) <= {limit}")
    kind = config.get("position_embedding_type")
    if family.positions.startswith("absolute") and kind not in (None, "absolute"):
        # transformers 5 implements absolute positions only: it drops the checkpoint's distance_embedding
        # and runs another model than the one trained (sentence-transformers too, so parity cannot tell)
        raise ValueError(f"{where}: position_embedding_type {kind!r} is not supported (only 'absolute')")
