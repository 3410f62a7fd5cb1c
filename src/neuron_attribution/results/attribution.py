"""What `attribute` returns: an `Attribution` with its parts, as dataclasses with a JSON form.

Field names are part of the interface (`attribute --json`, the run tables use the same names): new fields are
added, never renamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..files import read_json_as, write_json
from ..neurons import AttentionIndex, FfnIndex, HeadIndex
from .plain import plain_fields
from .quantization import QuantizationResidual


@dataclass(frozen=True)
class Prediction:
    token: str
    id: int
    prob: float


@dataclass
class TokenInfo:
    """A token the model could predict: its text, id, probability and rank (1 = the top prediction)."""

    text: str
    id: int
    prob: float
    rank: int


@dataclass
class TargetInfo:
    text: str
    id: int
    prob: float
    rank: int  # 1 = the model's top prediction
    n_answer_tokens: int = 1  # tokens the answer text spans; the first is scored
    # Contrastive attribution: every score is for log p(target) − log p(contrast) (docs/method.md §2).
    contrast: TokenInfo | None = None
    # answer_tokens="all": every answer token, each at its teacher-forced predicting position; the scores are sums.
    tokens: list[TokenInfo] | None = None
    answer: str | None = None  # the whole answer as tokenised (" San Francisco"); `text` is its first token

    @property
    def shown(self) -> str:
        """What to call the answer: the whole of it (its first token alone where it is one token)."""
        return self.answer or self.text

    def to_dict(self) -> dict[str, Any]:
        """Without `contrast`, `tokens` and `answer` where there are none."""
        return {k: v for k, v in plain_fields(self).items()
                if not (k in ("contrast", "tokens", "answer") and v is None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetInfo:
        contrast, tokens = data.get("contrast"), data.get("tokens")
        return cls(**{**data, "contrast": None if contrast is None else TokenInfo(**contrast),
                      "tokens": None if tokens is None else [TokenInfo(**t) for t in tokens]})


@dataclass
class LayerScores:
    attention: list[float]
    ffn: list[float]
    # each layer score's direct part (the change of the target's logit; the rest is −ΔLSE), first-token scoring
    attention_direct: list[float] | None = None
    ffn_direct: list[float] | None = None


@dataclass
class HeadScore:
    layer: int
    head: int
    score: float
    measured_change: float | None = None  # log p(target) changes by this when the head is switched off alone
    # its score's two parts as a value neuron's (docs/method.md §2): score = direct_score − normaliser_change
    direct_score: float | None = None
    normaliser_change: float | None = None

    @property
    def index(self) -> HeadIndex:
        return HeadIndex(self.layer, self.head)


@dataclass
class HeadPositionScore:
    layer: int
    head: int
    position: int
    token: str
    score: float


SINK_POSITION = 0


def reads_the_sink(position: int | None) -> bool:
    """Whether a neuron's reading sits at the first token: where attention sinks form (Xiao et al. 2023, "Efficient
    Streaming Language Models with Attention Sinks") and massive activations live (Sun et al. 2024, "Massive
    Activations in Large Language Models"), so that a large coefficient there says little about the prompt
    (docs/method.md §3)."""
    return position == SINK_POSITION


def wins_by_suppressing(score: float, target_push_rank: int, vocab_size: int) -> bool:
    """A positive score although the neuron's contribution raises the target less than it raises most tokens
    (a push rank in the lower half of the vocabulary): the gain comes from pushing the probable competitors
    down (docs/method.md §2)."""
    return score > 0 and target_push_rank > vocab_size / 2


class ScoreParts:
    """The two parts of a value neuron's score, Imp = c·δ_w − ΔLSE (docs/method.md §2): `direct_score`, the push
    on the target's own logit, and `normaliser_change`, the change of the log-normaliser, so that score =
    direct_score − normaliser_change. Both move alike with any shift the neuron gives every logit, so their sizes
    alone do not say how it wins; `target_push_rank` does: the target's rank among the tokens the neuron's
    contribution raises (1 = the most). `suppressed_tokens` are the ones it lowers most. With a contrast the
    normaliser cancels (direct = score, change 0) and the rank is not computed. Results written before these
    fields existed read back as None."""

    __slots__ = ()  # the neurons keep their fields in slots: every neuron's result holds 132,480 of them on SmolLM2

    score: float
    target_push_rank: int | None

    def wins_by_suppressing(self, vocab_size: int | None) -> bool | None:
        """Whether the neuron raises log p(target) although its contribution raises the target less than it
        raises most tokens (the lower half of `vocab_size`): then the gain comes from pushing the probable
        competitors down. None where the rank or the vocabulary size is unknown."""
        if self.target_push_rank is None or vocab_size is None:
            return None
        return wins_by_suppressing(self.score, self.target_push_rank, vocab_size)


@dataclass(slots=True)
class FfnNeuron(ScoreParts):
    layer: int
    neuron: int
    score: float
    coefficient: float
    top_tokens: list[str]  # the top of the raw value vector's vocabulary projection, U(γ ⊙ fc2)
    bottom_tokens: list[str]  # its bottom, most negative first
    # What the neuron's contribution m·fc2 pushes up: the top tokens when m ≥ 0, the bottom ones when m < 0.
    promoted_tokens: list[str] = field(default_factory=list)
    token_scores: list[float] | None = None  # answer_tokens="all": the score for each answer token
    # What the contribution pushes down most, the most lowered first: the other end from promoted_tokens.
    suppressed_tokens: list[str] = field(default_factory=list)
    direct_score: float | None = None  # see ScoreParts
    normaliser_change: float | None = None
    target_push_rank: int | None = None
    expert: int | None = None  # a mixture-of-experts layer's routed expert; `neuron` is the place in it
    # log p(target) (minus log p(contrast)) changes by this when the neuron is switched off alone (measure=N)
    measured_change: float | None = None
    # answer_tokens="all": the coefficient at each answer token's predicting position (`coefficient`: the first's)
    token_coefficients: list[float] | None = None

    def __post_init__(self) -> None:
        # One end of the value vector's projection each, by definition: the same lists, not copies.
        if not self.promoted_tokens:
            self.promoted_tokens = self.top_tokens if self.coefficient >= 0 else self.bottom_tokens
        if not self.suppressed_tokens:
            self.suppressed_tokens = self.bottom_tokens if self.coefficient >= 0 else self.top_tokens

    @property
    def index(self) -> FfnIndex:
        return FfnIndex(self.layer, self.neuron, self.expert)


@dataclass(slots=True)
class AttentionNeuron(ScoreParts):
    layer: int
    head: int
    dim: int
    position: int
    token: str
    score: float
    coefficient: float
    token_scores: list[float] | None = None  # answer_tokens="all": the score for each answer token
    # The ends of the contribution c·W_O[head, dim] read in the vocabulary: what it raises and lowers most.
    promoted_tokens: list[str] = field(default_factory=list)
    suppressed_tokens: list[str] = field(default_factory=list)
    direct_score: float | None = None  # see ScoreParts
    normaliser_change: float | None = None
    target_push_rank: int | None = None
    measured_change: float | None = None  # as FfnNeuron's
    sink: bool | None = None  # reads the first token (`reads_the_sink`); set from `position`
    # answer_tokens="all": the coefficient at each answer token's predicting position, None where that position
    # comes before the source position (`coefficient`: the first one that sees it)
    token_coefficients: list[float | None] | None = None

    def __post_init__(self) -> None:
        self.sink = reads_the_sink(self.position)

    @property
    def index(self) -> AttentionIndex:
        return AttentionIndex(self.layer, self.head, self.dim, self.position)


@dataclass
class QueryNeuron:
    """An FFN neuron scored for activating the top value neurons, through the path the attribution chose
    (`Attribution.query_via`): attention_score through the attention value neurons' value-projection rows,
    ffn_score through the FFN value neurons' subkeys (for SwiGLU ffn_score = gate_score + up_score; the two are
    None for GELU models). score is the chosen path's score (their sum for "both"); a path not taken is None.
    position: where the largest part of the score was read (an attention value neuron's source position, or the
    last position for the FFN path), token the prompt's token there, coefficient the neuron's coefficient
    there: positive, it writes its value vector (the top of `interpret_query_neuron`'s projection); negative,
    its opposite (the bottom)."""

    layer: int
    neuron: int
    score: float
    attention_score: float | None = None
    ffn_score: float | None = None
    gate_score: float | None = None
    up_score: float | None = None
    position: int | None = None
    token: str | None = None
    coefficient: float | None = None
    expert: int | None = None  # a mixture-of-experts layer's routed expert; `neuron` is the place in it
    sink: bool | None = None  # acts at the first token (`reads_the_sink`); set from `position`

    def __post_init__(self) -> None:
        self.sink = reads_the_sink(self.position)

    @property
    def index(self) -> FfnIndex:
        return FfnIndex(self.layer, self.neuron, self.expert)


@dataclass
class QueryLink:
    """A query FFN neuron's share in one value neuron's score (docs/method.md §3): `query` "layer_neuron",
    `value` the value neuron as text ("23_4_38@3" attention, "27_846" FFN). A query neuron's shares over the
    value neurons of the chosen path add up to its score."""

    query: str
    value: str
    share: float


@dataclass
class QueryLayer:
    component: str  # "embedding", "attention" or "ffn"
    layer: int | None  # None for the embedding
    score: float
    gate_score: float | None = None  # SwiGLU FFN value neurons: the two subkeys' parts of score
    up_score: float | None = None


@dataclass
class QueryLayers:
    for_ffn: list[QueryLayer]
    for_attention: list[QueryLayer]


@dataclass
class DenseScores:
    ffn: np.ndarray  # (L, N)
    attention: np.ndarray  # (L, H, d_h, T)


@dataclass
class Attribution:
    prompt: str
    model: str
    tokens: list[str]
    target: TargetInfo
    predictions: list[Prediction]
    layers: LayerScores
    heads: list[HeadScore]
    ffn_neurons: list[FfnNeuron]
    attention_neurons: list[AttentionNeuron]
    head_positions: list[HeadPositionScore]
    query_neurons: list[QueryNeuron] = field(default_factory=list)
    query_layers: QueryLayers = field(default_factory=lambda: QueryLayers([], []))
    query_skipped: list[str] = field(default_factory=list)  # value neurons whose subkey input h·K' ≈ 0
    # The top QUERY_LINKED query neurons' shares in each value neuron, largest magnitude first.
    query_links: list[QueryLink] = field(default_factory=list)
    reference: bool = False
    query_via: str = "attention"  # the value neurons query neurons were scored through: attention, ffn, both
    evaluated: dict[str, int] = field(default_factory=dict)  # neurons scored exactly, per kind
    # What the value neurons are ranked by: "score", or "direct" (its direct part, docs/method.md §2).
    rank_by: str = "score"
    vocab_size: int | None = None  # the tokens a neuron's push on the target is ranked among
    # measure=N: how many neurons of each kind carry a measured_change, and the change with all the measured value
    # neurons (FFN and attention) switched off together
    measured_top: int = 0
    measured_together: float | None = None
    # Quantized models: each sublayer's quantisation residual, the decomposition's component beside the neurons
    # (empty for a model that is not quantized)
    quantization_residuals: list[QuantizationResidual] = field(default_factory=list)
    dense: DenseScores | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = plain_fields(self, leave_out=("dense",))
        data["target"] = self.target.to_dict()
        for kind in ("ffn_neurons", "attention_neurons"):
            data[kind] = [{k: v for k, v in n.items()
                           if not (k in ("token_scores", "token_coefficients", "expert", "measured_change")
                                   and v is None)}
                          for n in data[kind]]
        data["heads"] = [{k: v for k, v in h.items()
                          if not (k in ("measured_change", "direct_score", "normaliser_change") and v is None)}
                         for h in data["heads"]]
        data["layers"] = {k: v for k, v in data["layers"].items() if v is not None}
        # gate/up parts exist only for SwiGLU models, experts only in mixtures: keys left out rather than nulled.
        data["query_neurons"] = [_without_missing_subkeys(q) for q in data["query_neurons"]]
        data["query_layers"] = {kind: [_without_missing_subkeys(q) for q in rows]
                                for kind, rows in data["query_layers"].items()}
        return data

    def save(self, path: Path | str) -> None:
        write_json(path, self.to_dict())

    def strongest_sources(self, head: HeadScore, n: int = 3) -> list[HeadPositionScore]:
        """The head's n highest-scoring source positions (only the top heads have position scores)."""
        own = [p for p in self.head_positions if (p.layer, p.head) == (head.layer, head.head)]
        return sorted(own, key=lambda p: -p.score)[:n]

    def graph(self, top: int | None = 20, share: float | None = None, sinks: bool = False) -> dict[str, Any]:
        """The circuit as nodes and links (README, "The attribution graph"): the `top` value neurons by |score|,
        or those making up `share` of their |scores|, the query neurons linked to them, tokens and answer; neurons
        reading the first token (`sink`) only with `sinks`."""
        from .graph import attribution_graph

        return attribution_graph(self, None if share is not None else top, share, sinks)

    def suppressing_neurons(self) -> list[FfnNeuron | AttentionNeuron]:
        """The value neurons, FFN first, that win by suppressing (`ScoreParts.wins_by_suppressing`)."""
        return [n for n in [*self.ffn_neurons, *self.attention_neurons] if n.wins_by_suppressing(self.vocab_size)]

    def _repr_html_(self) -> str:
        """Jupyter's display: the terminal report's tables, compact and escaped."""
        from .display import attribution_html

        return attribution_html(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attribution:
        return cls(
            prompt=data["prompt"], model=data.get("model", ""), tokens=data["tokens"],
            target=TargetInfo.from_dict(data["target"]),
            predictions=[Prediction(**p) for p in data.get("predictions", [])],
            layers=LayerScores(**data["layers"]), heads=[HeadScore(**h) for h in data["heads"]],
            ffn_neurons=[FfnNeuron(**n) for n in data["ffn_neurons"]],
            attention_neurons=[AttentionNeuron(**n) for n in data["attention_neurons"]],
            head_positions=[HeadPositionScore(**h) for h in data.get("head_positions", [])],
            query_neurons=[QueryNeuron(**q) for q in data.get("query_neurons", [])],
            query_layers=QueryLayers(*([QueryLayer(**q) for q in data.get("query_layers", {}).get(kind, [])]
                                       for kind in ("for_ffn", "for_attention"))),
            query_skipped=data.get("query_skipped", []),
            query_links=[QueryLink(**link) for link in data.get("query_links", [])],
            reference=data.get("reference", False), evaluated=data.get("evaluated", {}),
            rank_by=data.get("rank_by", "score"), vocab_size=data.get("vocab_size"),
            measured_top=data.get("measured_top", 0), measured_together=data.get("measured_together"),
            quantization_residuals=[QuantizationResidual(**r) for r in data.get("quantization_residuals", [])],
            # Files written before query_via existed ranked query neurons by both paths.
            query_via=data.get("query_via", "both"))

    @classmethod
    def load(cls, path: Path | str) -> Attribution:
        return read_json_as(path, cls.from_dict, "an attribution")


_OMITTED_WHEN_NONE = ("attention_score", "ffn_score", "gate_score", "up_score", "expert")


def _without_missing_subkeys(row: dict[str, Any]) -> dict[str, Any]:
    """Paths not taken and gate/up parts of GELU models are left out rather than nulled."""
    return {k: v for k, v in row.items() if not (k in _OMITTED_WHEN_NONE and v is None)}


@dataclass
class Projection:
    top_tokens: list[str]
    top_ids: list[int]
    top_values: list[float]
    bottom_tokens: list[str]
    bottom_ids: list[int]
    bottom_values: list[float]


@dataclass
class QueryValueSplit:
    """Top-n query FFN neurons, split by whether they are also among the top-n FFN value neurons."""

    n: int
    query_only: list[tuple[int, int]]  # (layer, neuron)
    query_value: list[tuple[int, int]]
    query_only_per_layer: list[int]  # histogram over layers
    query_value_per_layer: list[int]
