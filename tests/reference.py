"""Single-process training with plain peft + Hugging Face loss: the ground truth for exactness tests."""
import torch

from edge_runtime.data.dataset import OwnerData
from edge_runtime.models.lora import LoraSpec, adapter_key, apply_lora
from edge_runtime.models.registry import load_model
from ringtune.optimizer_spec import OptimizerSpec


def reference_adapter(model_name: str, lora: LoraSpec, optimizer: OptimizerSpec, data: OwnerData,
                      steps: int, privacy=None, plan=None, base_dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """privacy (a PrivacySpec) is applied where plan cuts: the end of the owner's head, the start of its tail;
    when it withholds gradients only the LoRA of the tail's blocks is trainable (and returned).
    base_dtype: the frozen weights hold the values a compact model of that dtype computes with (plain fp32
    modules)."""
    model = apply_lora(dequantized_model(load_model(model_name), base_dtype), lora)
    if privacy is not None and privacy.gradient == "withhold":
        freeze_all_but_blocks(model, range(*plan.stages[-1].layers))
    position = [0, 0]
    if privacy is not None:
        from edge_runtime.privacy.base import NoiseStream
        from edge_runtime.privacy.runner import gradient_mechanism, hidden_mechanism

        privatize_reference_cuts(model, plan, hidden_mechanism(privacy), gradient_mechanism(privacy),
                                 NoiseStream(privacy.seed), lambda: tuple(position), privacy.public)
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                              weight_decay=optimizer.weight_decay)
    for step in range(steps):
        batch = data.step_batch(step)
        for microbatch, (ids, labels) in enumerate(zip(batch.input_ids, batch.labels)):
            position[:] = [step, microbatch]
            # HF's gradient-accumulation-aware loss: token sum / tokens in the whole step.
            model(input_ids=ids, labels=labels, num_items_in_batch=batch.scored_tokens).loss.backward()
        adamw.step()
        adamw.zero_grad()
    return {adapter_key(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def dequantized_tolerance(base_dtype: str) -> float:
    """How far an adapter trained on compact weights may lie from plain peft on their dequantized fp32 values.

    1e-5 (float tolerance) except int8, which computes (x @ Q.T) * s and (dy * s) @ Q where peft computes
    x @ (Q * s).T and dy @ (Q * s): the same values rounded in another order (about one fp32 ulp per
    output). AdamW divides each gradient by its running RMS, so on entries whose gradient is near zero such
    differences reach the update at up to lr times their relative size: after 3 steps at lr 1e-2 the
    adapters differed by up to 2.3e-5 (tiny-gemma3; tiny-llama 6.7e-6, tiny-gpt2 7.8e-7), while int8 itself
    moves them 3-5e-2 from fp32 peft. 1e-4 is 4x that rounding and 300x under quantization's effect, so a
    wrong scale still fails. Splits are held to 1e-5 for every dtype (1 against 3 devices: the same
    compact modules, the same order)."""
    return 1e-4 if base_dtype == "int8" else 1e-5


def dequantized_model(model, base_dtype: str):
    """model with every weight that ringtune stores compactly replaced by the fp32 values it computes with."""
    from edge_runtime.models.quantization import compact_targets, dequantized

    targets = compact_targets(model)
    weights = {id(p): p for p in model.parameters()}
    with torch.no_grad():
        for weight_id, transposed in targets.items():  # Conv1D stores [in, out], quantized per output
            weight = weights[weight_id]
            values = dequantized(weight.T if transposed else weight, base_dtype)
            weight.copy_(values.T if transposed else values)
    return model


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def privatize_reference_cuts(model, plan, hidden, gradient, noise, position, public: int = 0):
    """Hooks on a (peft) model that apply the owner's mechanisms where plan's ring cuts: on the output of
    its head's last block (hidden, positions < public untouched) and on the gradient into its tail's first
    block (gradient). position() gives the current (step, micro-batch); noise is a NoiseStream with the
    ring's seed (keyed by the owner's role, as the ring's is)."""
    from edge_runtime.models.structure import find_parts

    blocks = find_parts(model).blocks
    head_end, tail_start = plan.stages[0].layers[1], plan.stages[-1].layers[0]

    def on_head_output(_, __, output):
        hidden_out = output[0] if isinstance(output, tuple) else output
        private = hidden.apply(hidden_out, noise.generator(*position(), "head", "hidden"), public)
        return (private, *output[1:]) if isinstance(output, tuple) else private

    def on_tail_input(_, args, kwargs):
        tensor = args[0] if args else kwargs["hidden_states"]
        tensor.register_hook(lambda grad: gradient.apply(grad, noise.generator(*position(), "tail", "gradient")))

    handles = []
    if hidden is not None:
        handles.append(blocks[head_end - 1].register_forward_hook(on_head_output))
    if gradient is not None:
        handles.append(blocks[tail_start].register_forward_pre_hook(on_tail_input, with_kwargs=True))
    return handles


def freeze_all_but_blocks(model, blocks) -> None:
    """Only the LoRA tensors of these blocks stay trainable (peft model)."""
    from edge_runtime.models.structure import find_parts

    keep = {id(p) for b in blocks for p in find_parts(model).blocks[b].parameters()}
    for parameter in model.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)


def assert_peft_reproduces_the_trained_model(name: str, out, lora: LoraSpec = LoraSpec(4, 8, seed=11)) -> None:
    """The adapter a run wrote loads in plain peft and gives the trained model's logits (blocks the adapter leaves
    out keep their initial LoRA, whose B is zero: they change nothing)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    trained = apply_lora(load_model(name), lora)
    names = {param_name.replace(".default.", "."): param for param_name, param in trained.named_parameters()
             if param.requires_grad}
    assert tensors.keys() <= names.keys()
    with torch.no_grad():
        for key, tensor in tensors.items():
            names[key].copy_(tensor)
    loaded = PeftModel.from_pretrained(load_model(name), str(out))
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        expected, actual = trained(input_ids=ids).logits, loaded(input_ids=ids).logits
        base = load_model(name)(input_ids=ids).logits
    assert torch.allclose(actual, expected, atol=1e-6)
    assert not torch.allclose(actual, base, atol=1e-4), "the adapter changed nothing"
