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

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from audit.attacks import LinearInverter, forward_label_auc, label_auc, nearest_neighbour_recovery
from edge_runtime.data.dataset import OwnerData, Record, common_prefix_length, encode_record, pad_records
from edge_runtime.evaluation import evaluate, label_set
from edge_runtime.local_ring import train_ring_in_process
from edge_runtime.models.lora import LoraSpec, adapter_key, apply_lora, lora_parameters, write_adapter
from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.models.stage import StageModule
from edge_runtime.models.structure import find_parts
from edge_runtime.privacy.base import HiddenMechanism, NoiseStream
from edge_runtime.privacy.calibration import calibrated, head_states
from edge_runtime.privacy.public_text import public_token_batches
from edge_runtime.privacy.runner import gradient_mechanism, hidden_mechanism
from ringtune.adapter_metadata import ADAPTER_METADATA_FILE
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Plan, StageSpec, validate_plan
from ringtune.privacy_spec import PRESETS, PrivacySpec


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
    """Also d_chi settings calibrated per K on public text: mean noise norm = ratio x the median token norm at
    the cut, clip at clip_quantile of those norms."""
    clip_quantile: float = 0.5
    """Clip of the dchi_ratios settings, as a quantile of public text's token norms at the cut."""
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
    lr: float | None = None
    """AdamW learning rate of every fine-tune; None: each setting's, as ringtune train runs it
    (PrivacySpec.learning_rate)."""
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
    eval_every: int = 0
    """With test: also evaluate every this many fine-tuning steps (the learning curve); 0: only at the end."""
    adapters: Path | None = None
    """With test: write each fine-tuned setting's adapter (peft format) under this directory, and reuse one an
    earlier audit of the same run and setting wrote there instead of fine-tuning again."""


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
    attacked: str = "base"
    """The model whose states and gradients were attacked: base, or fine-tuned under the setting."""
    setting: str = ""
    """The setting's name, the same at every K: off, a preset, d_chi RATIOx (calibrated) or the --privacy text."""
    learning_curve: list[dict] = field(default_factory=list)
    """Held-out {"step", "loss", "accuracy"} during fine-tuning (with eval_every), the last step included."""
    aligned_direction_auc: float | None = None
    """Label attack by cosine to a known positive's gradient, sequences aligned at their end."""
    forward_label_auc: float | None = None
    """Label attack on the hidden state at the label's position (the completion is an input token too)."""
    forward_label_accuracy: float | None = None
    """Share of labels the learned inverter reads right from that hidden state (chance: 1 / labels)."""


@dataclass(frozen=True, slots=True)
class Labelled:
    """The training records the label attacks target."""
    records: list[Record]
    """The records (a prefix of the training data)."""
    positive: torch.Tensor
    """[r] bool: the record has the positive label."""
    positions: torch.Tensor
    """[r] the position of each record's first label token that tells the labels apart (an input too)."""
    candidates: torch.Tensor | None
    """[C] each label's token at that point of the completion (None: a label is another's prefix)."""
    positive_column: int
    """The positive label's index in candidates."""
    truth: torch.Tensor
    """[r] each record's label's index in candidates."""


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
    """Their token ids [n, T] (right-padded), completions included also when the run hides its labels (then
    their positions' states come from padding, and a recovered completion token is a leak)."""
    counted: torch.Tensor
    """[n, T] the positions token recovery counts: real tokens after the prefix all attacked records share."""
    shared_prefix: int
    """Length of that shared prefix."""
    gradients: torch.Tensor | None
    """Gradient of the completion loss w.r.t. the input of block L - K per labelled record [r, T, d]."""
    label_states: torch.Tensor | None
    """Hidden states after block K of the labelled records [r, T, d]."""


def run_audit(settings: AuditSettings, report=print) -> list[AuditRow]:
    model = load_model(settings.model).eval()
    tokenizer = load_tokenizer(settings.model)
    num_blocks = len(find_parts(model).blocks)
    ks = tuple(sorted({*settings.owner_blocks, *(PRESETS[s.preset].owner_blocks for s in settings.privacy if s.preset)}))
    for spec in settings.privacy:
        if spec.preset and 2 * PRESETS[spec.preset].owner_blocks >= num_blocks:
            raise ValueError(f"--privacy {spec.preset} keeps {PRESETS[spec.preset].owner_blocks} blocks at each end "
                             f"and a neighbour needs one: this model has {num_blocks}; audit it with --owner-blocks "
                             f"and --dchi-ratios instead")
    for k in ks:
        if not 1 <= k or 2 * k >= num_blocks:
            raise ValueError(f"--owner-blocks {k}: the owner keeps K blocks at each end and a neighbour needs "
                             f"one, so use 1 <= K < {num_blocks / 2:g} for this model")
    for spec in settings.privacy:
        spec.check_seq_len(settings.seq_len)
    embeddings = find_parts(model).embed.weight.detach()  # [V, d]: public, the attacker has the base model
    labelled = _labelled(settings, tokenizer)
    views = _cut_views(model, tokenizer, settings, labelled, num_blocks, ks)
    hidden_label_views = None  # the base model's views of runs that hide their labels, computed once if needed
    rows, off_model = [], None
    for k in ks:
        for name, spec in _specs_for(settings, k, views[k]):
            if not settings.test:
                if spec.hide_labels and hidden_label_views is None:
                    hidden_label_views = _cut_views(model, tokenizer, settings, labelled, num_blocks, ks,
                                                    PrivacySpec(hide_labels=True))
                view = hidden_label_views[k] if spec.hide_labels else views[k]
                row = _attack_row(settings, k, spec, view, [views[k].public], embeddings, labelled)
            else:
                if spec == PrivacySpec():  # off trains the same at every cut: once is enough
                    tuned = off_model = off_model or _fine_tuned(settings, spec, k, name, num_blocks, report)
                else:
                    tuned = _fine_tuned(settings, spec, k, name, num_blocks, report)
                final = tuned.curve[-1] if tuned.curve else _curve_point(settings.steps, held_out(
                    tuned.model, settings, spec, k))
                view = _cut_views(tuned.model, tokenizer, settings, labelled, num_blocks, (k,), spec)[k]
                row = replace(_attack_row(settings, k, spec, view, [views[k].public, view.public], embeddings,
                                          labelled), eval_loss=final["loss"], accuracy=final["accuracy"],
                              train_losses=tuned.train_losses, attacked="fine-tuned", learning_curve=tuned.curve)
            row = replace(row, setting=name)
            report(format_row(row))
            rows.append(row)
    return rows


def _specs_for(settings: AuditSettings, k: int, view: CutViews) -> list[tuple[str, PrivacySpec]]:
    """(name, setting) pairs to audit at one K: off, the --privacy settings (a preset only at its own K, with
    --public-prefix unless it names public=, calibrated on the public text's states there), the ratios."""
    public = settings.public_prefix or 0
    quantile = "" if settings.clip_quantile == 0.5 else f", clip at q{settings.clip_quantile:g}"
    ratios = [(f"d_chi {ratio:g}x{quantile}",
               calibrated(PrivacySpec("dchi", epsilon=1.0, clip=1.0, gradient=settings.grad_privacy, public=public),
                          view.public, ratio, settings.clip_quantile)) for ratio in settings.dchi_ratios]
    given = [(s.describe(), s) for s in settings.privacy if not s.preset]
    presets = [(s.preset, calibrated(replace(s, public=s.public or public), view.public,
                                     PRESETS[s.preset].noise_ratio, PRESETS[s.preset].clip_quantile))
               for s in settings.privacy if s.preset and PRESETS[s.preset].owner_blocks == k]
    if k not in settings.owner_blocks:  # audited only for a preset
        return presets
    return [("off", PrivacySpec())] * settings.baseline + given + presets + ratios


def _attack_row(settings: AuditSettings, k: int, spec: PrivacySpec, view: CutViews, attacker_public: list[torch.Tensor],
                embeddings: torch.Tensor, labelled: Labelled | None) -> AuditRow:
    """The attacks on what the neighbour receives from view's model. attacker_public: the public text's states
    [S, T, d] an attacker may train the inverter on (the base model's; also the fine-tuned head's, for an
    attacker who obtained the owner's adapter): the best of those inverters counts."""
    noise = NoiseStream(settings.seed)
    mechanism = hidden_mechanism(spec)
    private, label_states = view.private, view.label_states
    if mechanism is not None:  # whole sequences, so positions < spec.public pass as in the run
        private = mechanism.apply(private, noise.generator(0, 0, "head", "audit-private"), spec.public)
        attacker_public = [mechanism.apply(p, noise.generator(0, i, "head", "audit-public"), spec.public)
                           for i, p in enumerate(attacker_public)]
        if label_states is not None:
            label_states = mechanism.apply(label_states, noise.generator(0, 0, "head", "audit-labels"), spec.public)
    private, tokens = private[view.counted], view.private_tokens[view.counted]  # [n', d], [n']
    inverters = [LinearInverter(p.flatten(0, 1), view.public_tokens.flatten(), embeddings) for p in attacker_public]
    aucs = {}
    if view.gradients is not None:
        if spec.gradient != "withhold":  # withheld: the neighbour receives no gradient to attack
            aucs = label_auc(_privatized_gradients(view.gradients, spec, settings, noise), labelled.positive)
        at_label = label_states[torch.arange(len(label_states)), labelled.positions]  # [r, d]
        if labelled.candidates is not None:
            scores = [i.scores(at_label, labelled.candidates) for i in inverters]  # [r, C] per inverter
            aucs["forward_label_auc"] = max(forward_label_auc(s, labelled.positive_column, labelled.positive)
                                            for s in scores)
            aucs["forward_label_accuracy"] = max(float((s.argmax(dim=1) == labelled.truth).float().mean())
                                                 for s in scores)
    signal = float(view.private[view.counted].norm(dim=-1).mean())
    return AuditRow(k, spec, None if mechanism is None else mechanism.mean_noise_norm(private.shape[-1]) / signal,
                    spec.token_epsilon(), nearest_neighbour_recovery(private, tokens, embeddings),
                    max(i.recovery(private, tokens) for i in inverters), aucs.get("norm_auc"), aucs.get("direction_auc"),
                    None, None, [], view.shared_prefix, aligned_direction_auc=aucs.get("aligned_direction_auc"),
                    forward_label_auc=aucs.get("forward_label_auc"),
                    forward_label_accuracy=aucs.get("forward_label_accuracy"))


def _privatized_gradients(gradients: torch.Tensor, spec: PrivacySpec, settings: AuditSettings,
                          noise: NoiseStream) -> torch.Tensor:
    mechanism = gradient_mechanism(spec)
    if mechanism is None:
        return gradients
    groups = gradients.split(settings.micro_batch_size)  # the tail privatizes one micro-batch at a time
    return torch.cat([mechanism.apply(g, noise.generator(0, i, "tail", "audit-gradient")) for i, g in enumerate(groups)])


def _labelled(settings: AuditSettings, tokenizer) -> Labelled | None:
    """The label attacks' records (None for free-text data, or labels whose first tokens coincide)."""
    labels = label_set(settings.train)
    if labels is None:
        return None
    positive_label = next((l for l in labels if l.strip() == "positive"), labels[-1])
    records = settings.train[:settings.label_records]
    positive = torch.tensor([r.completion == positive_label for r in records])
    if not 0 < int(positive.sum()) < len(records) - 1:
        return None
    encoded = [tokenizer.encode(label) for label in labels]
    differ = common_prefix_length(encoded)  # the labels' first token that tells them apart
    candidates = [ids[differ] for ids in encoded if differ < len(ids)]
    positions = [len(ids) - len(tokenizer.encode(r.completion)) - 1 + differ  # completion, then end-of-text
                 for r, ids in ((r, encode_record(r, tokenizer, settings.seq_len)[0]) for r in records)]
    distinct = len(set(candidates)) == len(labels)
    return Labelled(records, positive, torch.tensor(positions), torch.tensor(candidates) if distinct else None,
                    labels.index(positive_label), torch.tensor([labels.index(r.completion) for r in records]))


def _cut_views(model, tokenizer, settings: AuditSettings, labelled, num_blocks: int, ks: tuple[int, ...],
               spec: PrivacySpec = PrivacySpec()) -> dict[int, CutViews]:
    """What a neighbour after block K would receive from model (unprivatized states; gradients computed on the
    forward pass spec privatizes, as in training; sequences encoded as spec.hide_labels has it), for each K in
    ks."""
    ks = list(ks)
    public_ids = public_token_batches(tokenizer, settings.public_sequences, settings.seq_len)
    public = {k: [] for k in ks}
    for batch in public_ids.split(8):
        for k, h in head_states(model, batch, ks).items():
            public[k].append(h)
    private_ids, real = _encoded(settings.train[:settings.attack_records], tokenizer, settings.seq_len)
    shared, counted = _private_positions(private_ids, real)
    sent_ids = _encoded(settings.train[:settings.attack_records], tokenizer, settings.seq_len, spec.hide_labels)[0]
    private = {k: [] for k in ks}
    for batch in sent_ids.split(8):
        for k, h in head_states(model, batch, ks).items():
            private[k].append(h)
    gradients, label_states = None, {}
    if labelled:
        gradients = _cut_gradients(model, tokenizer, labelled.records, settings, [num_blocks - k for k in ks], spec)
        label_ids, _ = _encoded(labelled.records, tokenizer, settings.seq_len, spec.hide_labels)
        for batch in label_ids.split(8):
            for k, h in head_states(model, batch, ks).items():
                label_states.setdefault(k, []).append(h)
    return {k: CutViews(torch.cat(public[k]), public_ids, torch.cat(private[k]), private_ids, counted, shared,
                        gradients[num_blocks - k] if gradients else None,
                        torch.cat(label_states[k]) if labelled else None) for k in ks}


def _private_positions(ids: torch.Tensor, real: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(length of the token prefix every record shares, mask [n, T] of the real tokens after it)."""
    shared = common_prefix_length([row[mask].tolist() for row, mask in zip(ids, real)])
    counted = real.clone()
    counted[:, :shared] = False
    if not counted.any():
        raise ValueError(f"the {len(ids)} attacked records are the same {shared} tokens, so none is private: "
                         f"raise --attack-records or audit records that differ")
    return shared, counted


def _encoded(records: list[Record], tokenizer, seq_len: int, hide_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, T] and the mask of real tokens [n, T]."""
    ids, _, lengths = pad_records(records, tokenizer, seq_len, hide_labels=hide_labels)
    return ids, torch.arange(seq_len) < lengths[:, None]


def _cut_gradients(model, tokenizer, records: list[Record], settings: AuditSettings, starts: list[int],
                   spec: PrivacySpec) -> dict[int, torch.Tensor]:
    """d(completion loss)/d(input of block s) per record [n, T, d] for each s in starts (records are
    independent, so one record's gradient in a batch is its own). Backpropagates only the tail. With a
    hidden-state mechanism in spec (one K, so one start), the forward is privatized after block L - s."""
    parts = find_parts(model)
    first = min(starts)
    head = StageModule(parts, model.config, (0, first), "head")
    tail = StageModule(parts, model.config, (first, len(parts.blocks)), "tail")
    mechanism = hidden_mechanism(spec)
    generator = torch.Generator().manual_seed(settings.seed)
    cut = parts.blocks[len(parts.blocks) - first - 1]
    grads: dict[int, list[torch.Tensor]] = {s: [] for s in starts}
    for chunk in [records[i:i + 8] for i in range(0, len(records), 8)]:
        ids, labels, _ = pad_records(chunk, tokenizer, settings.seq_len, hide_labels=spec.hide_labels)
        handle = None if mechanism is None else cut.register_forward_hook(
            lambda _, __, out: _privatize_output(out, mechanism, generator, spec.public, 1))
        try:
            with torch.no_grad():
                hidden = head(ids)  # [B, T, d]
        finally:
            if handle is not None:
                handle.remove()
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
        model.zero_grad(set_to_none=True)  # a fine-tuned model's LoRA tensors got gradients too
    return {s: torch.cat(g) for s, g in grads.items()}


@dataclass(slots=True)
class FineTuned:
    """A model fine-tuned under one setting, and how it learned."""
    model: torch.nn.Module
    """The peft model holding the trained LoRA of every stage (owner's blocks included)."""
    train_losses: list[float]
    """Fine-tuning loss per step."""
    curve: list[dict] = field(default_factory=list)
    """Held-out {"step", "loss", "accuracy"} every eval_every steps (the last step included)."""


def fine_tune(settings: AuditSettings, spec: PrivacySpec, k: int, num_blocks: int,
              report=lambda line: None) -> FineTuned:
    """Fine-tune over an in-process ring cut at K under spec (the distributed run's math, noise included);
    with settings.eval_every, also evaluate on the held-out records every eval_every steps and after the last."""
    plan = Plan(settings.model, "owner", (StageSpec("owner", (0, k), "head"),
                                          StageSpec("neighbour", (k, num_blocks - k), "middle"),
                                          StageSpec("owner", (num_blocks - k, num_blocks), "tail")),
                "1f1b", settings.micro_batches)
    validate_plan(plan, num_blocks)
    tokenizer = load_tokenizer(settings.model)
    data = OwnerData(settings.train, tokenizer, settings.micro_batch_size, settings.seq_len,
                     settings.micro_batches, settings.seed, spec.hide_labels)
    peft_model = apply_lora(load_model(settings.model), replace(settings.lora, seed=settings.seed))
    curve: list[dict] = []
    started, evaluating = time.perf_counter(), [0.0]  # seconds spent evaluating so far

    def checkpoint(step: int) -> None:
        if settings.eval_every and ((step + 1) % settings.eval_every == 0 or step + 1 == settings.steps):
            began = time.perf_counter()
            training = (began - started - evaluating[0]) / (step + 1)
            curve.append(_curve_point(step + 1, held_out(peft_model, settings, spec, k)))
            evaluating[0] += time.perf_counter() - began
            report(f"K={k}, {spec.describe()}: step {step + 1}, held-out loss {curve[-1]['loss']:.4f}, "
                   f"accuracy {curve[-1]['accuracy']} ({training:.1f} s per training step, "
                   f"{time.perf_counter() - began:.0f} s to evaluate)")
            peft_model.train()

    optimizer = OptimizerSpec(lr=spec.learning_rate(settings.lr))
    losses = train_ring_in_process(peft_model, plan, data, optimizer, settings.steps, replace(spec, seed=settings.seed),
                                   after_step=checkpoint).losses
    return FineTuned(peft_model, losses, curve)


def _curve_point(step: int, result) -> dict:
    return {"step": step, "loss": result.loss, "accuracy": result.accuracy}


def _fine_tuned(settings: AuditSettings, spec: PrivacySpec, k: int, name: str, num_blocks: int,
                report) -> FineTuned:
    """fine_tune, or with settings.adapters the adapter an earlier audit of the same run wrote there (so the
    attacks can be re-run without re-training; a preset reuses the run of a setting with its numbers); a new
    one is written there."""
    if settings.adapters is None:
        return fine_tune(settings, spec, k, num_blocks, report)
    run = {"model": settings.model, "owner_blocks": k, "privacy": replace(spec, preset="").to_dict(),
           "steps": settings.steps, "micro_batches": settings.micro_batches,
           "micro_batch_size": settings.micro_batch_size, "seq_len": settings.seq_len,
           "lr": spec.learning_rate(settings.lr),
           "lora": settings.lora.to_dict(), "seed": settings.seed, "train": len(settings.train),
           "test": len(settings.test), "eval_every": settings.eval_every}
    for saved_file in sorted(settings.adapters.glob("*/ringtune.json")):
        saved = json.loads(saved_file.read_text())
        if saved.get("run") == run:
            peft_model = apply_lora(load_model(settings.model), replace(settings.lora, seed=settings.seed))
            tensors = load_file(saved_file.parent / "adapter_model.safetensors")
            for tensor_name, parameter in lora_parameters(peft_model).items():
                parameter.data.copy_(tensors[adapter_key(tensor_name)])
            report(f"K={k}, {name}: reusing the adapter fine-tuned in {saved_file.parent}")
            return FineTuned(peft_model, saved["train_losses"], saved["learning_curve"])
    folder = settings.adapters / f"k{k}-{''.join(c if c.isalnum() or c in '.-' else '-' for c in name).strip('-')}"
    tuned = fine_tune(settings, spec, k, num_blocks, report)
    tensors = {adapter_key(n): t for n, t in lora_parameters(tuned.model).items()}
    write_adapter(folder, settings.lora, settings.model, tensors)
    (folder / ADAPTER_METADATA_FILE).write_text(json.dumps({  # settings.privacy: ringtune evaluate scores it as trained
        "run": run, "settings": {"privacy": spec.public_dict()}, "train_losses": tuned.train_losses,
        "learning_curve": tuned.curve}, indent=1))
    return tuned


def held_out(peft_model: torch.nn.Module, settings: AuditSettings, spec: PrivacySpec, k: int):
    """Held-out loss and accuracy, privatized after block K as inference over the ring is: one noise draw per
    record, shared by its candidate labels (one forward pass over the ring would score them all)."""
    mechanism = hidden_mechanism(spec)
    group = len(label_set(settings.test) or [None])  # evaluate() puts a record's candidates in consecutive rows
    handle = None
    if mechanism is not None:
        generator = torch.Generator().manual_seed(settings.seed)
        handle = find_parts(peft_model).blocks[k - 1].register_forward_hook(
            lambda _, __, out: _privatize_output(out, mechanism, generator, spec.public, group))
    try:
        return evaluate(peft_model.eval(), load_tokenizer(settings.model), settings.test, settings.seq_len,
                        hide_labels=spec.hide_labels)
    finally:
        if handle is not None:
            handle.remove()


def _privatize_output(output, mechanism: HiddenMechanism, generator: torch.Generator, public: int, group: int):
    hidden = output[0] if isinstance(output, tuple) else output  # [rows, T, d], rows = records x group
    noise = mechanism.noise((hidden.shape[0] // group, *hidden.shape[1:]), generator).to(hidden.dtype)
    private = mechanism.add_noise(hidden, noise.repeat_interleave(group, dim=0), public)
    return (private, *output[1:]) if isinstance(output, tuple) else private


def format_row(row: AuditRow) -> str:
    pct = lambda v: "-" if v is None else f"{v:.1%}"
    num = lambda v, f=".3f": "-" if v is None else format(v, f)
    sent = num if row.privacy.gradient != "withhold" else lambda v: "no gradient sent"
    return (f"| {row.owner_blocks} | {row.privacy.describe()} | {num(row.noise_to_signal, '.2f')} | "
            f"{pct(row.nn_recovery)} | {pct(row.learned_recovery)} | {sent(row.norm_auc)} | {sent(row.direction_auc)} | "
            f"{sent(row.aligned_direction_auc)} | {num(row.forward_label_auc)} | {pct(row.forward_label_accuracy)} | "
            f"{num(row.eval_loss)} | {pct(row.accuracy)} |")


TABLE_HEADER = ("| K | setting | E noise / E norm | NN token recovery | learned token recovery | label AUC (norm) | "
                "label AUC (direction) | label AUC (direction, aligned) | label AUC (hidden state) | "
                "label read (hidden state) | eval loss | accuracy |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def recovery_note(rows: list[AuditRow]) -> str:
    """What token recovery counts, for under the table."""
    shared = rows[0].shared_prefix if rows else 0
    return (f"Token recovery and E norm count only private positions: the first {shared} token(s), shared by "
            f"every attacked record (a public template), are left out. Label AUC (aligned): the direction attack "
            f"with sequences aligned at their end; (hidden state): the label read from its own position's hidden "
            f"state, since the completion is an input token of the forward pass too (with labels never sent, that "
            f"position holds padding, and token recovery still counts the completion's positions).")
