"""Reference ``policy.pt`` -> our format: heads, backbone and names survive; nothing is unpickled
beyond tensors and plain values; every tensor is accounted for."""
import pytest
import torch

from mahalo_engine.policy import load_policy
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.models.loader import load_decoder
from training.convert import convert, main


def _reference_state(model_dir, h=2, tied_alias=True):
    """A state dict laid out as the reference's MultiHeadCausalLM: base_model.* + heads.i.weight,
    with base_model.lm_head.weight being heads.0.weight."""
    dec = load_decoder(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    heads = [dec.lm_head.weight.detach() + 0.01 * torch.randn(dec.lm_head.weight.shape, generator=g)
             for _ in range(h)]
    state = {f"base_model.{k}": v for k, v in dec.state_dict().items() if k != "lm_head.weight"}
    state["base_model.lm_head.weight"] = heads[0] if tied_alias else heads[0].clone() + 1
    state.update({f"heads.{i}.weight": w for i, w in enumerate(heads)})
    return dec, state, torch.stack(heads)


def test_convert_multihead_policy_pt(tmp_path):
    model = tiny_checkpoint("qwen2")
    dec, state, heads = _reference_state(model)
    pt = tmp_path / "policy.pt"
    torch.save({"step_idx": 640, "state": state, "metrics": {"loss": 0.5}}, pt)
    out = tmp_path / "out"
    assert main(["--policy-pt", str(pt), "--base", str(model), "--objectives", "acc,eng",
                 "--out", str(out)]) == 0
    policy = load_policy(out)
    assert policy.objectives == ["acc", "eng"]
    assert torch.equal(policy.heads, heads)
    for k, v in dec.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(policy.model.state_dict()[k], v), k
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        hidden = dec(ids)
    for i in range(2):  # logits of head i == the reference model with lm_head = heads[i]
        onehot = [float(j == i) for j in range(2)]
        torch.testing.assert_close(policy.logits(ids, onehot), hidden @ heads[i].T, rtol=1e-5, atol=1e-5)


def test_convert_rejects_bad_checkpoints(tmp_path):
    model = tiny_checkpoint("qwen2")
    _, state, _ = _reference_state(model)
    pt = tmp_path / "policy.pt"

    torch.save({"state": state}, pt)
    with pytest.raises(ValueError, match="holds 2 heads: pass --objectives"):
        convert(pt, model, tmp_path / "o1")

    torch.save({"state": {**state, "base_model.model.extra.weight": torch.zeros(1)}}, pt)
    with pytest.raises(ValueError, match=r"unexpected tensors: \['model.extra.weight'\]"):
        convert(pt, model, tmp_path / "o2", objectives=["a", "b"])

    _, state2, _ = _reference_state(model, tied_alias=False)
    torch.save({"state": state2}, pt)
    with pytest.raises(ValueError, match="differs from heads.0.weight"):
        convert(pt, model, tmp_path / "o3", objectives=["a", "b"])

    missing = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    torch.save({"state": missing}, pt)
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        convert(pt, model, tmp_path / "o4", objectives=["a", "b"])

    k = "base_model.model.layers.0.mlp.down_proj.weight"
    torch.save({"state": {**state, k: state[k][:, :-1]}}, pt)
    with pytest.raises(ValueError, match=r"mis-shaped tensors: \['model.layers.0.mlp.down_proj.weight: "):
        convert(pt, model, tmp_path / "o5", objectives=["a", "b"])

    short = {**state, **{f"heads.{i}.weight": state[f"heads.{i}.weight"][:-1] for i in range(2)}}
    short["base_model.lm_head.weight"] = short["heads.0.weight"]
    torch.save({"state": short}, pt)
    with pytest.raises(ValueError, match=r"heads.N.weight are \(\d+, \d+\), but .*config.json expects"):
        convert(pt, model, tmp_path / "o6", objectives=["a", "b"])


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_convert_never_unpickles_arbitrary_objects(tmp_path, capsys):
    model = tiny_checkpoint("qwen2")
    _, state, _ = _reference_state(model)
    pt = tmp_path / "policy.pt"
    torch.save({"state": state, "payload": _Payload()}, pt)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        convert(pt, model, tmp_path / "out", objectives=["a", "b"])
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_convert_sft_policy_pt_with_plain_names(tmp_path):
    model = tiny_checkpoint("qwen2")
    dec = load_decoder(model, dtype=torch.float32)
    pt = tmp_path / "policy.pt"
    torch.save({"step_idx": 1, "state": dec.state_dict(), "metrics": {}}, pt)
    convert(pt, model, tmp_path / "out")
    policy = load_policy(tmp_path / "out")
    assert policy.objectives == ["lm_head"]
    assert torch.equal(policy.heads[0], dec.lm_head.weight)
