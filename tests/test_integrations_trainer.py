"""ZOTrainer: MeZO steps inside the Hugging Face Trainer (tiny BERT built from a config)."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, TrainerCallback  # noqa: E402

import fastzo  # noqa: E402
from fastzo.integrations.transformers import TrainerMeZO, ZOTrainer, ZOTrainingArguments  # noqa: E402

SEQ = 12


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: thread start-up would dominate, and the machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bert(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


class TokenDataset(torch.utils.data.Dataset):
    """Pre-tokenized examples; label = whether the first token is in the upper half of the vocab."""

    def __init__(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, SEQ), generator=g)
        self.labels = (self.ids[:, 0] >= 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i]}


def make_args(out, **overrides):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
                zo_eps=1e-3, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                zo_backend="torch", disable_tqdm=True, seed=7)
    base.update(overrides)
    return ZOTrainingArguments(**base)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_trainer_runs_mezo_steps_with_scheduler_and_logs(tmp_path):
    model = tiny_bert()
    before = weights(model)
    args = make_args(tmp_path, max_steps=4, lr_scheduler_type="linear", eval_strategy="steps",
                     eval_steps=2)
    trainer = ZOTrainer(model=model, args=args, train_dataset=TokenDataset(64),
                        eval_dataset=TokenDataset(16, seed=2))
    result = trainer.train()
    assert result.global_step == 4
    opt = trainer.zo_optimizer
    assert isinstance(opt, TrainerMeZO) and opt.step_count == 4
    # All trainable parameters moved; no gradient was ever computed.
    after = weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in model.parameters())
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 2
    for h in train_logs:
        assert {"projected_grad", "step_time", "perturb_share", "learning_rate"} <= h.keys()
        assert "grad_norm" not in h
        assert 0.0 <= h["perturb_share"] <= 1.0 and h["step_time"] > 0
    # HF's linear schedule drives MeZO's lr: 1e-3 · (4 − t)/4 at step t; the last step used 2.5e-4.
    assert train_logs[0]["learning_rate"] > train_logs[1]["learning_rate"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    assert any("eval_loss" in h for h in trainer.state.log_history)
    # Two param groups as in HF: weight decay for weights, not for biases and LayerNorm.
    assert len(opt.param_groups) == 2


def test_gradient_accumulation_uses_all_micro_batches_with_one_z(tmp_path):
    """k micro-batches of b examples = one MeZO step over k·b examples with the same z."""
    data = TokenDataset(64)
    runs = {}
    for name, (batch, accum) in {"accumulated": (4, 2), "plain": (8, 1)}.items():
        model = tiny_bert()
        trainer = ZOTrainer(model=model, args=make_args(tmp_path / name, max_steps=3,
                                                        per_device_train_batch_size=batch,
                                                        gradient_accumulation_steps=accum),
                            train_dataset=data)
        trainer.train()
        assert trainer.zo_optimizer.step_count == 3
        runs[name] = (weights(model), trainer.zo_optimizer.last_step)
    (wa, last_a), (wp, last_p) = runs["accumulated"], runs["plain"]
    assert last_a.seed == last_p.seed
    # The mean of two batch means equals the batch mean up to float32 rounding.
    assert last_a.loss_plus == pytest.approx(last_p.loss_plus, abs=1e-5)
    for name in wa:
        torch.testing.assert_close(wa[name], wp[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, fused):
    data = TokenDataset(64)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, zo_fused_steps=fused,
                  zo_trajectory="auto", eval_strategy="steps", eval_steps=2)

    full_model = tiny_bert()
    start = weights(full_model)
    full = ZOTrainer(model=full_model, args=make_args(tmp_path / "full", **common),
                     train_dataset=data, eval_dataset=TokenDataset(8, seed=3))
    full.train()
    assert full.zo_optimizer.weights_are_clean
    reference = weights(full_model)

    # Interrupted after the checkpoint at step 2, then resumed by a new trainer.
    first = ZOTrainer(model=tiny_bert(), args=make_args(tmp_path / "split", **common),
                      train_dataset=data, eval_dataset=TokenDataset(8, seed=3), callbacks=[StopAt(3)])
    first.train()
    checkpoint = tmp_path / "split" / "checkpoint-2"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what the Trainer loads
    assert state["mezo"]["step"] == 2 and state["mezo"]["pending"] is None
    resumed_model = tiny_bert(seed=123)  # different init: the checkpoint must restore everything
    resumed = ZOTrainer(model=resumed_model, args=make_args(tmp_path / "split", **common),
                        train_dataset=data, eval_dataset=TokenDataset(8, seed=3))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.zo_optimizer.step_count == 4
    assert_same(weights(resumed_model), reference)

    # The trajectory of the interrupted-and-resumed run replays to the same weights.
    replay_model = tiny_bert()
    assert_same(weights(replay_model), start)
    params = [p for p in replay_model.parameters()]
    groups = resumed.zo_optimizer.param_groups
    names = {id(p): n for n, p in resumed_model.named_parameters()}
    by_name = dict(replay_model.named_parameters())
    replay_groups = [{"params": [by_name[names[id(p)]] for p in g["params"]]} for g in groups]
    assert sum(len(g["params"]) for g in replay_groups) == len(params)
    fastzo.replay(replay_groups, tmp_path / "split" / "zo_trajectory.jsonl", backend="torch")
    assert_same(weights(replay_model), reference)


def test_fused_checkpoint_holds_clean_weights(tmp_path):
    """The saved model in fused mode equals the plain run's, not θ + εz."""
    from safetensors.torch import load_file

    saved = {}
    for fused in (False, True):
        out = tmp_path / str(fused)
        trainer = ZOTrainer(model=tiny_bert(), args=make_args(out, max_steps=2, save_strategy="steps",
                                                              save_steps=2, zo_fused_steps=fused),
                            train_dataset=TokenDataset(32))
        trainer.train()
        saved[fused] = load_file(out / "checkpoint-2" / "model.safetensors")
    for name, value in saved[False].items():
        # Same trajectory; fused rounds differently by a few ulp, a pending εz would be ~1e-3.
        torch.testing.assert_close(saved[True][name], value, rtol=0, atol=1e-6)


def test_forward_mode_and_dropout(tmp_path):
    """Both forwards of a step see the same model: eval mode, or train mode with shared masks."""
    for eval_mode in (True, False):
        model = tiny_bert(dropout=0.3)
        model.train()
        trainer = ZOTrainer(model=model, args=make_args(tmp_path / str(eval_mode), max_steps=2,
                                                        learning_rate=0.0, zo_eps=1e-6,
                                                        zo_eval_mode_forward=eval_mode),
                            train_dataset=TokenDataset(32))
        trainer.train()
        last = trainer.zo_optimizer.last_step
        # With different dropout masks the two losses would differ by ~1e-2.
        assert abs(last.loss_plus - last.loss_minus) < 1e-4
        assert model.training


def test_rejects_unsupported_setups(tmp_path):
    model = tiny_bert()
    with pytest.raises(TypeError, match="TrainerMeZO"):
        ZOTrainer(model=model, args=make_args(tmp_path), train_dataset=TokenDataset(8),
                  optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    opt = TrainerMeZO(model.parameters(), lr=1e-3, backend="torch")
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    trainer = ZOTrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=TokenDataset(8),
                        optimizers=(opt, None))
    trainer.train()
    assert opt.step_count == 1


def test_log_history_is_json_serialisable(tmp_path):
    trainer = ZOTrainer(model=tiny_bert(), args=make_args(tmp_path, max_steps=2, logging_steps=1),
                        train_dataset=TokenDataset(16))
    trainer.train()
    json.dumps(trainer.state.log_history)
