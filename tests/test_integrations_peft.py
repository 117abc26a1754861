"""PEFT: with a LoRA model only the adapter weights are perturbed and updated."""

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fastzo  # noqa: E402
from fastzo.integrations.transformers import ZOTrainer  # noqa: E402
from test_integrations_trainer import TokenDataset, make_args, one_thread, tiny_bert  # noqa: E402,F401


def lora_model():
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8,
                             target_modules=["query", "value"], lora_dropout=0.0)
    return peft.get_peft_model(tiny_bert(), config)


def split(model):
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def check_only_adapters_moved(model, before):
    trainable0, frozen0 = before
    trainable1, frozen1 = split(model)
    assert frozen0.keys() == frozen1.keys() and len(frozen0) > 0
    for name in frozen0:  # the base model, bit for bit
        assert torch.equal(frozen0[name], frozen1[name]), name
    lora = [n for n in trainable0 if "lora_" in n]
    assert lora and all(not torch.equal(trainable0[n], trainable1[n]) for n in lora)


def test_zotrainer_updates_only_lora_weights(tmp_path):
    model = lora_model()
    before = split(model)
    trainer = ZOTrainer(model=model, args=make_args(tmp_path, max_steps=3, learning_rate=1e-2),
                        train_dataset=TokenDataset(32))
    trainer.train()
    opt = trainer.zo_optimizer
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    check_only_adapters_moved(model, before)


def test_plain_mezo_on_peft_model():
    model = lora_model()
    before = split(model)
    data = TokenDataset(16)
    batch = {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids), "labels": data.labels}
    opt = fastzo.MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-2, backend="torch")
    model.eval()
    for _ in range(2):
        opt.step(lambda: model(**batch).loss)
    check_only_adapters_moved(model, before)
