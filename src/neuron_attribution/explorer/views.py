"""What the explorer's pages show, computed with the library and returned as JSON-ready dicts. Nothing here
knows about HTTP: each method takes checked arguments and raises `UserError` for what a user got wrong.

Every number comes from the library's own functions (`attribute_with`, `last_logits` with an `Ablation`,
`project`), so the page shows exactly what a script would compute.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import UserError
from ..model.interventions import Ablation, last_logits
from ..model.loaded import LoadedModel
from ..model.prompts import encode_prompt, encode_target, token_text, token_texts
from ..model.readout import project_to_vocabulary
from ..neurons import AttentionIndex, FfnIndex, HeadIndex, NeuronIndex, parse_neuron
from ..model.forward import FAST_ATTENTION_FROM_TOKENS
from ..pipelines.attribute import attribute_with
from ..pipelines.circuit import circuit
from ..pipelines.measure import measured_changes
from ..pipelines.predict import top_predictions
from ..pipelines.projection import neuron_vector, projection_of
from ..pipelines.targets import token_info
from ..results.attribution import Attribution
from ..results.plain import plain_fields
from ..scoring.token_search import TokenSearch
from ..settings import ANSWER_TOKENS, QUERY_PATHS, ScoringOptions

MAX_TOP = 1000  # value neurons of each kind a page may ask for
PROJECTION_SHOWN = 20  # tokens at each end of a neuron's vocabulary projection
PREDICTIONS_SHOWN = 5
SEARCH_SHOWN = 30
TABLE_ROWS = 20  # rows of the prompt view's neuron tables
CACHED_ATTRIBUTIONS = 32


@dataclass(frozen=True)
class PromptQuery:
    """One prompt view: the prompt, the answer (None: the model's top prediction), an optional contrast, which
    answer tokens are scored and how many value neurons of each kind."""

    prompt: str
    target: str | None = None
    contrast: str | None = None
    answer_tokens: str = "first"
    top: int = 100
    query_via: str | None = None  # which value neurons query neurons are scored through (None: the server's)

    @classmethod
    def of(cls, data: Any) -> PromptQuery:
        if not isinstance(data, dict):
            raise UserError("the request body must be a JSON object")
        prompt = _text(data, "prompt", required=True)
        target, contrast = _text(data, "target"), _text(data, "contrast")
        answer_tokens = data.get("answer_tokens", "first")
        if answer_tokens not in ANSWER_TOKENS:
            raise UserError(f"answer_tokens must be one of {', '.join(ANSWER_TOKENS)}")
        top = data.get("top", 100)
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= MAX_TOP:
            raise UserError(f"top must be a whole number from 1 to {MAX_TOP}")
        query_via = data.get("query_via")
        if query_via is not None and query_via not in QUERY_PATHS:
            raise UserError(f"query_via must be one of {', '.join(QUERY_PATHS)}")
        return cls(prompt, target or None, contrast or None, answer_tokens, top, query_via)


def _text(data: dict, key: str, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise UserError(f"{key} must be {'non-empty ' if required else ''}text")
    return value


def neuron_list(data: Any) -> list[NeuronIndex]:
    if not isinstance(data, list) or not data or not all(isinstance(n, str) for n in data):
        raise UserError("neurons must be a non-empty list of neuron names such as \"27_846\" or \"23_4_38@3\"")
    if len(data) > 10_000:
        raise UserError("at most 10,000 neurons at once")
    return [parse_neuron(n) for n in data]


def scale_of(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError("scale must be a number (0 switches the neurons off, k amplifies them k-fold)")
    return float(value)


class Views:
    """The model-facing half of the explorer. Its methods run on the model queue's one thread; the cache of
    recent attributions is locked anyway, so that a caller off that thread stays safe."""

    def __init__(self, model: LoadedModel, options: ScoringOptions):
        self.model = model
        self.options = options
        self._cache: OrderedDict[PromptQuery, tuple[Attribution, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        self._token_search = TokenSearch(model.adapter)

    # -- the prompt view --------------------------------------------------------------------------------------

    def attribution(self, query: PromptQuery) -> Attribution:
        return self._attributed(query)[0]

    def _attributed(self, query: PromptQuery) -> tuple[Attribution, dict[str, Any]]:
        """The attribution and the answer's outcome without intervention (as `intervene` computes it)."""
        with self._lock:
            if query in self._cache:
                self._cache.move_to_end(query)
                return self._cache[query]
        options = replace(self.options, top_k=query.top, answer_tokens=query.answer_tokens,
                          query_via=query.query_via or self.options.query_via)
        (result,) = attribute_with(self.model, [query.prompt], [query.target], options, contrasts=[query.contrast])
        unchanged = self._outcome(last_logits(self.model, [query.prompt])[0], result.target.id)
        with self._lock:
            self._cache[query] = (result, unchanged)
            while len(self._cache) > CACHED_ATTRIBUTIONS:
                self._cache.popitem(last=False)
        return result, unchanged

    def prompt_view(self, query: PromptQuery) -> dict[str, Any]:
        result = self.attribution(query)
        everything = len(result.ffn_neurons) + len(result.attention_neurons)
        heads = result.heads[:TABLE_ROWS]
        return {
            "query": query.__dict__, "query_via": result.query_via, "model": result.model, "prompt": result.prompt, "tokens": result.tokens,
            "target": result.target.to_dict(), "predictions": [p.__dict__ for p in result.predictions],
            "vocab_size": result.vocab_size, "layers": result.layers.__dict__,
            "heads": [{**h.__dict__, "name": str(h.index),
                       "sources": [{"position": s.position, "token": s.token, "score": s.score}
                                   for s in result.strongest_sources(h)]} for h in heads],
            "ffn_neurons": [_row(n) for n in result.ffn_neurons[:TABLE_ROWS]],
            "attention_neurons": [_row(n) for n in result.attention_neurons[:TABLE_ROWS]],
            "query_neurons": [{**q.__dict__, "name": str(q.index)}
                              for q in result.query_neurons[:TABLE_ROWS]],
            "graph": result.graph(top=max(1, everything), sinks=True),  # the page hides them behind a toggle
            **self._circuit(query, len(result.tokens)),
        }

    def _circuit(self, query: PromptQuery, n_tokens: int) -> dict[str, Any]:
        """The prompt's multi-hop circuit (`pipelines.circuit`), or why there is none."""
        if query.answer_tokens != "first":
            return {"circuit": None, "circuit_note": "circuits are drawn for the first answer token"}
        if n_tokens >= FAST_ATTENTION_FROM_TOKENS:
            return {"circuit": None, "circuit_note": f"circuits are drawn for prompts under "
                                                     f"{FAST_ATTENTION_FROM_TOKENS} tokens"}
        options = replace(self.options, query_via=query.query_via or self.options.query_via)
        return {"circuit": circuit(self.model, query.prompt, query.target, options=options, contrast=query.contrast),
                "circuit_note": None}

    # -- interventions ----------------------------------------------------------------------------------------

    def intervene(self, query: PromptQuery, neurons: list[NeuronIndex], scale: float) -> dict[str, Any]:
        """The answer's probability and rank and the top predictions with `neurons` scaled by `scale` (0:
        switched off), beside the same numbers without the intervention, both from `last_logits`."""
        result, before = self._attributed(query)
        target = result.target  # the answer token the page shows (default: the top prediction)
        after = last_logits(self.model, [query.prompt], Ablation.of(neurons, scale=scale))[0]
        return {"neurons": [str(n) for n in neurons], "scale": scale,
                "target": {"text": target.text, "id": target.id},
                "answer_tokens": len(target.tokens) if target.tokens else 1,  # the first one is measured
                "before": before, "after": self._outcome(after, target.id)}

    def measure(self, query: PromptQuery, neurons: list[NeuronIndex]) -> dict[str, Any]:
        """Each neuron switched off alone, and all of them together: the measured change of log p(answer) (minus
        log p(contrast) with one), the numbers `measure=N` stores beside scores (docs/method.md §5)."""
        result, _ = self._attributed(query)
        alone, together = measured_changes(self.model, query.prompt, result, neurons, neurons)
        return {"target": {"text": result.target.text, "id": result.target.id},
                "contrast": None if result.target.contrast is None else result.target.contrast.text,
                "alone": [{"neuron": str(n), "measured_change": change} for n, change in zip(neurons, alone)],
                "together": together}

    def _outcome(self, logits: torch.Tensor, target_id: int) -> dict[str, Any]:
        answer = token_info(torch.softmax(logits.double(), dim=-1), target_id, token_text(self.model, target_id))
        return {"prob": answer.prob, "rank": answer.rank,
                "predictions": [p.__dict__ for p in top_predictions(self.model, logits, PREDICTIONS_SHOWN)]}

    # -- neurons ----------------------------------------------------------------------------------------------

    def neuron(self, index: NeuronIndex) -> dict[str, Any]:
        """Both ends of an FFN or attention neuron's vocabulary projection; for a head, the top tokens of each of
        its d_h neurons (a head has no single vector)."""
        self.model.shape.check(index)
        if isinstance(index, HeadIndex):
            return {"kind": "head", "name": str(index), "layer": index.layer, "head": index.head,
                    "neurons": self._head_neurons(index)}
        if isinstance(index, AttentionIndex) and index.position is not None:
            index = index._replace(position=None)  # its vector is the same at every source position
        projection = projection_of(self.model, neuron_vector(self.model, index), PROJECTION_SHOWN)
        kind = "ffn" if isinstance(index, FfnIndex) else "attention"
        return {"kind": kind, "name": str(index), **index._asdict(), "projection": projection.__dict__}

    def _head_neurons(self, head: HeadIndex) -> list[dict[str, Any]]:
        s = self.model.shape
        first = s.head_column(head.head, 0)
        vectors = self.model.adapter.output_weight_stack.layers[head.layer].rows(
            torch.arange(first, first + s.head_dim))
        logits = project_to_vocabulary(self.model.adapter.final_norm(), self.model.adapter.unembedding_matrix,
                                       vectors)
        top, bottom = logits.topk(3).indices.tolist(), logits.topk(3, largest=False).indices.tolist()
        return [{"name": f"{head.layer}_{head.head}_{dim}", "dim": dim, "top_tokens": token_texts(self.model, t),
                 "bottom_tokens": token_texts(self.model, b)} for dim, (t, b) in enumerate(zip(top, bottom))]

    # -- search -----------------------------------------------------------------------------------------------

    def token_id(self, text: str) -> int:
        """The one token `text` is (quotes around it are dropped, so that ' Paris' can show its space)."""
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        if not text:
            raise UserError("search for a token, e.g. ' Paris', or a neuron, e.g. 27_846")
        if self.model.tokenizer is None:
            raise UserError("this model has no tokenizer; search by neuron")
        ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"{text!r} is {len(ids)} tokens ({', '.join(map(repr, token_texts(self.model, ids)))}); "
                            "search for one token")
        return ids[0]

    def other_variant(self, text: str) -> dict[str, Any] | None:
        """For a search typed without quotes or a leading space ("Paris"), the word as it follows a space
        (" Paris", another token) where that is one token too: the page names both and links the other."""
        if not text or text[0] in "'\"" or text[0].isspace() or self.model.tokenizer is None:
            return None
        ids = self.model.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            return None
        shown = token_text(self.model, ids[0])
        return {"token": shown, "token_id": ids[0], "query": repr(shown)}

    def promoting(self, token_id: int, shown: int = SEARCH_SHOWN) -> dict[str, Any]:
        """Which neurons' vocabulary projections single the token out (`scoring.token_search`): the top and
        bottom z of every FFN and attention neuron. High z: a positive coefficient raises the token more than
        most; low z: a negative one does."""
        found: dict[str, Any] = {"token": token_text(self.model, token_id), "token_id": token_id}
        for kind, (logit, z) in self._token_search.scores(token_id).items():
            rows = logit.shape[1]
            found[kind] = {end: [self._found(kind, rows, int(flat), float(logit.flatten()[flat]),
                                             float(z.flatten()[flat]))
                                 for flat in z.flatten().topk(shown, largest=largest).indices.tolist()]
                           for end, largest in (("promote", True), ("suppress", False))}
        return found

    def _found(self, kind: str, rows: int, flat: int, logit: float, z: float) -> dict[str, Any]:
        layer, row = divmod(flat, rows)
        head_dim = self.model.shape.head_dim
        index = self.model.shape.ffn_index(layer, row) if kind == "ffn" else \
            AttentionIndex(layer, *divmod(row, head_dim))
        return {"name": str(index), "layer": layer, "centred_logit": logit, "z": z}

    def check_target(self, query: PromptQuery) -> None:
        """A UserError now for a target that is no token of this model (before the work is queued)."""
        if query.target is not None:
            ids = encode_prompt(self.model, query.prompt)
            encode_target(self.model, ids, query.prompt, query.target)


def _row(neuron) -> dict[str, Any]:
    data = plain_fields(neuron)
    data["name"] = str(neuron.index)
    return data
