"""Play the curious middle device against a run's configuration, in one process on the owner's side.

For each number of blocks K the owner keeps at each end, the neighbour receives the hidden states after
block K (from the owner's head) and the gradients into block L - K (from the owner's tail), privatized
by the same mechanism code the owner's runners use. Utility is measured by fine-tuning over an
in-process ring with that cut and that privacy (the exact math of the distributed run), then
evaluating on held-out data with the same privatization at the cut (as ring inference would).

Token recovery counts only private positions: the leading tokens every attacked record shares (a prompt
template such as ``Tweet:``) are public whatever the setting, so they are left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from audit.attacks import LinearInverter, label_auc, nearest_neighbour_recovery
from audit.public_text import public_token_batches
from edge_runtime.data.dataset import OwnerData, Record, common_prefix_length, pad_records
from edge_runtime.evaluation import evaluate, label_set
from edge_runtime.local_ring import train_ring_in_process
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.models.stage import StageModule
from edge_runtime.models.structure import find_parts
from edge_runtime.privacy.base import NoiseStream
from edge_runtime.privacy.runner import gradient_mechanism, hidden_mechanism
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Plan, StageSpec, validate_plan
from ringtune.privacy_spec import PrivacySpec


@dataclass(frozen=True, slots=True)
class AuditSettings:
    model: str
    """Model name or local path."""
    train: list[Record]
    """The owner's private training records (fine-tuning, and the attacks' targets)."""
    test: list[Record]
    """Held-out records for utility (empty: no fine-tuning, attacks only)."""
    owner_blocks: tuple[int, ...] = (1, 2, 4)
    """Values of K (blocks the owner keeps at each end) to audit."""
    privacy: tuple[PrivacySpec, ...] = ()
    """Settings to compare against no privatization (added first)."""
    dchi_ratios: tuple[float, ...] = ()
    """Also d_chi settings calibrated per K: clip = median token norm at the cut, E r = ratio * clip."""
    public_prefix: int | None = None
    """Leading positions the calibrated settings send unprivatized (their public=); None: privatize all."""
    grad_privacy: str = "off"
    """Gradient mechanism of the calibrated settings."""
    baseline: bool = True
    """Also audit no privatization (the reference the others are compared with)."""
    steps: int = 20
    """Fine-tuning steps per setting."""
    micro_batches: int = 2
    """Micro-batches per step."""
    micro_batch_size: int = 4
    """Sequences per micro-batch (also the label attack's group for max-norm)."""
    seq_len: int = 64
    """Tokens per sequence."""
    lr: float = 1e-3
    """AdamW learning rate."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA shape."""
    seed: int = 0
    """Seed of the data order, the LoRA init and the simulated noise."""
    public_sequences: int = 96
    """Public-text sequences the learned inverter trains on."""
    attack_records: int = 64
    """Private records whose hidden states the attacks invert."""
    label_records: int = 48
    """Private records whose gradients the label attack scores."""


@dataclass(frozen=True, slots=True)
class AuditRow:
    owner_blocks: int
    """K: blocks the owner keeps at each end."""
    privacy: PrivacySpec
    """The setting audited."""
    noise_to_signal: float | None
    """Expected noise norm per token over the mean hidden-state norm at the cut (None when off)."""
    token_epsilon: float | None
    """Per-token epsilon of the hidden-state mechanism (see PrivacySpec.token_epsilon)."""
    nn_recovery: float
    """Share of private tokens recovered by nearest-neighbour inversion."""
    learned_recovery: float
    """Share of private tokens recovered by the inverter trained on public text."""
    norm_auc: float | None
    """Label attack by gradient norm (max(AUC, 1 - AUC)); None without label data."""
    direction_auc: float | None
    """Label attack by cosine to a known positive's gradient."""
    eval_loss: float | None
    """Held-out completion loss after fine-tuning under the setting (None: not fine-tuned)."""
    accuracy: float | None
    """Held-out label accuracy after fine-tuning under the setting."""
    train_losses: list[float] = field(default_factory=list)
    """Fine-tuning loss per step."""
    shared_prefix: int = 0
    """Leading positions every attacked record shares: public, so left out of token recovery."""


@dataclass(frozen=True, slots=True)
class CutViews:
    """What the neighbour would receive with privacy off, for one K."""
    public: torch.Tensor
    """Hidden states after block K of the public text [S, T, d]."""
    public_tokens: torch.Tensor
    """Their token ids [S, T]."""
    private: torch.Tensor
    """Hidden states after block K of the attacked private records [n, T, d]."""
    private_tokens: torch.Tensor
    """Their token ids [n, T] (right-padded)."""
    counted: torch.Tensor
    """[n, T] the positions token recovery counts: real tokens after the prefix all attacked records share."""
    shared_prefix: int
    """Length of that shared prefix."""
    gradients: torch.Tensor | None
    """Gradient of the completion loss w.r.t. the input of block L - K per labelled record [r, T, d]."""


def run_audit(settings: AuditSettings, report=print) -> list[AuditRow]:
    model = load_model(settings.model).eval()
    tokenizer = load_tokenizer(settings.model)
    num_blocks = len(find_parts(model).blocks)
    for k in settings.owner_blocks:
        if not 1 <= k or 2 * k >= num_blocks:
            raise ValueError(f"--owner-blocks {k}: the owner keeps K blocks at each end and a neighbour needs "
                             f"one, so use 1 <= K < {num_blocks / 2:g} for this model")
    for spec in settings.privacy:
        spec.check_seq_len(settings.seq_len)
    embeddings = find_parts(model).embed.weight.detach()  # [V, d]: public, the attacker has the base model
    labelled = _labelled(settings)
    views = _cut_views(model, tokenizer, settings, labelled, num_blocks)
    rows, off_utility = [], None
    for k in settings.owner_blocks:
        view = views[k]
        for spec in _specs_for(settings, view):
            if not settings.test:
                utility = None
            elif spec == PrivacySpec():  # privacy off trains the same at every cut: once is enough
                off_utility = off_utility or _utility(settings, spec, k, num_blocks)
                utility = off_utility
            else:
                utility = _utility(settings, spec, k, num_blocks)
            row = _attack_row(settings, k, spec, view, embeddings, labelled, utility)
            report(format_row(row))
            rows.append(row)
    return rows


def _specs_for(settings: AuditSettings, view: CutViews) -> list[PrivacySpec]:
    public = settings.public_prefix or 0
    clip = float(view.public[:, public:].norm(dim=-1).median())  # the positions the mechanism will clip
    dim = view.public.shape[-1]
    calibrated = [PrivacySpec("dchi", epsilon=dim / (ratio * clip), clip=clip, gradient=settings.grad_privacy,
                              public=public) for ratio in settings.dchi_ratios]
    return [PrivacySpec()] * settings.baseline + [*settings.privacy, *calibrated]


def _attack_row(settings: AuditSettings, k: int, spec: PrivacySpec, view: CutViews, embeddings: torch.Tensor,
                labelled: tuple[list[Record], torch.Tensor] | None, utility) -> AuditRow:
    noise = NoiseStream(settings.seed)
    mechanism = hidden_mechanism(spec)
    public, private = view.public, view.private
    if mechanism is not None:  # whole sequences, so positions < spec.public pass as in the run
        public = mechanism.apply(public, noise.generator(0, 0, "head", "audit-public"), spec.public)
        private = mechanism.apply(private, noise.generator(0, 0, "head", "audit-private"), spec.public)
    inverter = LinearInverter(public.flatten(0, 1), view.public_tokens.flatten(), embeddings)
    private, tokens = private[view.counted], view.private_tokens[view.counted]  # [n', d], [n']
    aucs = {"norm_auc": None, "direction_auc": None}
    if view.gradients is not None:
        aucs = label_auc(_privatized_gradients(view.gradients, spec, settings, noise), labelled[1])
    signal = float(view.private[view.counted].norm(dim=-1).mean())
    return AuditRow(k, spec, None if mechanism is None else mechanism.mean_noise_norm(private.shape[-1]) / signal,
                    spec.token_epsilon(), nearest_neighbour_recovery(private, tokens, embeddings),
                    inverter.recovery(private, tokens), aucs["norm_auc"], aucs["direction_auc"],
                    utility[0] if utility else None, utility[1] if utility else None,
                    utility[2] if utility else [], view.shared_prefix)


def _privatized_gradients(gradients: torch.Tensor, spec: PrivacySpec, settings: AuditSettings,
                          noise: NoiseStream) -> torch.Tensor:
    mechanism = gradient_mechanism(spec)
    if mechanism is None:
        return gradients
    groups = gradients.split(settings.micro_batch_size)  # the tail privatizes one micro-batch at a time
    return torch.cat([mechanism.apply(g, noise.generator(0, i, "tail", "audit-gradient")) for i, g in enumerate(groups)])


def _labelled(settings: AuditSettings) -> tuple[list[Record], torch.Tensor] | None:
    """Records for the label attack and whether each has the positive label (None for free-text data)."""
    labels = label_set(settings.train)
    if labels is None:
        return None
    positive_label = next((l for l in labels if l.strip() == "positive"), labels[-1])
    records = settings.train[:settings.label_records]
    positive = torch.tensor([r.completion == positive_label for r in records])
    return (records, positive) if 0 < int(positive.sum()) < len(records) - 1 else None


def _cut_views(model, tokenizer, settings: AuditSettings, labelled, num_blocks: int) -> dict[int, CutViews]:
    ks = list(settings.owner_blocks)
    public_ids = public_token_batches(tokenizer, settings.public_sequences, settings.seq_len)
    public = {k: [] for k in ks}
    for batch in public_ids.split(8):
        for k, h in _head_states(model, batch, ks).items():
            public[k].append(h)
    private_ids, real = _encoded(settings.train[:settings.attack_records], tokenizer, settings.seq_len)
    shared, counted = _private_positions(private_ids, real)
    private = {k: [] for k in ks}
    for batch in private_ids.split(8):
        for k, h in _head_states(model, batch, ks).items():
            private[k].append(h)
    gradients = _cut_gradients(model, tokenizer, labelled[0], settings.seq_len, [num_blocks - k for k in ks]) \
        if labelled else None
    return {k: CutViews(torch.cat(public[k]), public_ids, torch.cat(private[k]), private_ids, counted, shared,
                        gradients[num_blocks - k] if gradients else None) for k in ks}


def _private_positions(ids: torch.Tensor, real: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(length of the token prefix every record shares, mask [n, T] of the real tokens after it)."""
    shared = common_prefix_length([row[mask].tolist() for row, mask in zip(ids, real)])
    counted = real.clone()
    counted[:, :shared] = False
    if not counted.any():
        raise ValueError(f"the {len(ids)} attacked records are the same {shared} tokens, so none is private: "
                         f"raise --attack-records or audit records that differ")
    return shared, counted


@torch.no_grad()
def _head_states(model, ids: torch.Tensor, ks: list[int]) -> dict[int, torch.Tensor]:
    """Hidden states [B, T, d] after k blocks for each k, running only the first max(ks) blocks."""
    parts = find_parts(model)
    captured: dict[int, torch.Tensor] = {}

    def capture(k):
        return lambda _, __, out: captured.__setitem__(k, out[0] if isinstance(out, tuple) else out)

    handles = [parts.blocks[k - 1].register_forward_hook(capture(k)) for k in ks]
    try:
        StageModule(parts, model.config, (0, max(ks)), "head")(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _encoded(records: list[Record], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, T] and the mask of real tokens [n, T]."""
    ids, _, lengths = pad_records(records, tokenizer, seq_len)
    return ids, torch.arange(seq_len) < lengths[:, None]


def _cut_gradients(model, tokenizer, records: list[Record], seq_len: int, starts: list[int]) -> dict[int, torch.Tensor]:
    """d(completion loss)/d(input of block s) per record [n, T, d] for each s in starts (records are
    independent, so one record's gradient in a batch is its own). Backpropagates only the tail."""
    parts = find_parts(model)
    first = min(starts)
    head = StageModule(parts, model.config, (0, first), "head")
    tail = StageModule(parts, model.config, (first, len(parts.blocks)), "tail")
    grads: dict[int, list[torch.Tensor]] = {s: [] for s in starts}
    for chunk in [records[i:i + 8] for i in range(0, len(records), 8)]:
        ids, labels, _ = pad_records(chunk, tokenizer, seq_len)
        with torch.no_grad():
            hidden = head(ids)  # [B, T, d]
        inputs: dict[int, torch.Tensor] = {}

        def keep(s):
            def hook(_, args, kwargs):
                inputs[s] = args[0] if args else kwargs["hidden_states"]
                inputs[s].retain_grad()
            return hook

        handles = [parts.blocks[s].register_forward_pre_hook(keep(s), with_kwargs=True) for s in starts]
        try:
            tail.loss_sum(hidden.requires_grad_(True), labels).backward()
        finally:
            for handle in handles:
                handle.remove()
        for s in starts:
            grads[s].append(inputs[s].grad.detach())
    return {s: torch.cat(g) for s, g in grads.items()}


def _utility(settings: AuditSettings, spec: PrivacySpec, k: int,
             num_blocks: int) -> tuple[float, float | None, list[float]]:
    """(held-out loss, accuracy, train losses) after fine-tuning over an in-process ring cut at K."""
    plan = Plan(settings.model, "owner", (StageSpec("owner", (0, k), "head"),
                                          StageSpec("neighbour", (k, num_blocks - k), "middle"),
                                          StageSpec("owner", (num_blocks - k, num_blocks), "tail")),
                "1f1b", settings.micro_batches)
    validate_plan(plan, num_blocks)
    tokenizer = load_tokenizer(settings.model)
    data = OwnerData(settings.train, tokenizer, settings.micro_batch_size, settings.seq_len,
                     settings.micro_batches, settings.seed)
    peft_model = apply_lora(load_model(settings.model), replace(settings.lora, seed=settings.seed))
    seeded = replace(spec, seed=settings.seed)
    losses = train_ring_in_process(peft_model, plan, data, OptimizerSpec(lr=settings.lr), settings.steps, seeded).losses
    mechanism = hidden_mechanism(spec)
    handle = None
    if mechanism is not None:  # inference over the ring privatizes at the same cut
        generator = torch.Generator().manual_seed(settings.seed)
        block = find_parts(peft_model).blocks[k - 1]
        handle = block.register_forward_hook(
            lambda _, __, out: _privatize_output(out, mechanism, generator, spec.public))
    try:
        result = evaluate(peft_model.eval(), tokenizer, settings.test, settings.seq_len)
    finally:
        if handle is not None:
            handle.remove()
    return result.loss, result.accuracy, losses


def _privatize_output(output, mechanism, generator, public: int):
    hidden = output[0] if isinstance(output, tuple) else output  # [B, T, d]
    private = mechanism.apply(hidden, generator, public)
    return (private, *output[1:]) if isinstance(output, tuple) else private


def format_row(row: AuditRow) -> str:
    pct = lambda v: "-" if v is None else f"{v:.1%}"
    num = lambda v, f=".3f": "-" if v is None else format(v, f)
    return (f"| {row.owner_blocks} | {row.privacy.describe()} | {num(row.noise_to_signal, '.2f')} | "
            f"{pct(row.nn_recovery)} | {pct(row.learned_recovery)} | {num(row.norm_auc)} | {num(row.direction_auc)} | "
            f"{num(row.eval_loss)} | {pct(row.accuracy)} |")


TABLE_HEADER = ("| K | setting | E noise / E norm | NN token recovery | learned token recovery | label AUC (norm) | "
                "label AUC (direction) | eval loss | accuracy |\n|---|---|---|---|---|---|---|---|---|")


def recovery_note(rows: list[AuditRow]) -> str:
    """What token recovery counts, for under the table."""
    shared = rows[0].shared_prefix if rows else 0
    return (f"Token recovery and E norm count only private positions: the first {shared} token(s), shared by "
            f"every attacked record (a public template), are left out.")
