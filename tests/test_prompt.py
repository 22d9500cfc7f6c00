"""Prompt tuning and P-tuning: virtual tokens before the input embeddings, with masks, labels and generate()."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS


def build(family: str) -> torch.nn.Module:
    return TINY_MODELS[f"{family}-tiny"]().eval()


def adapter_of(model: torch.nn.Module):
    return model.get_input_embeddings().peftkit_adapters["p"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_equal_prepending_embeddings_by_hand(family, method):
    torch.manual_seed(0)
    model = build(family)
    base = copy.deepcopy(model)
    peftkit.attach(model, {"adapters": {"p": [{"method": method, "length": 3}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    virtual = adapter_of(model).virtual_tokens().detach()
    embeds = torch.cat([virtual.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    wide_mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
    expected = base(inputs_embeds=embeds, attention_mask=wide_mask)[0]
    got = model(input_ids=ids, attention_mask=mask)[0]
    assert got.shape[1] == 3 + 6
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_labels_of_virtual_positions_are_ignored(family):
    torch.manual_seed(0)
    model = build(family)
    base = copy.deepcopy(model)
    peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 4}]}})
    ids = torch.randint(2, 128, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    virtual = adapter_of(model).virtual_tokens().detach()
    embeds = torch.cat([virtual.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    labels = torch.cat([torch.full((2, 4), -100), ids], dim=1)
    torch.testing.assert_close(loss, base(inputs_embeds=embeds, labels=labels).loss)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_greedy_generate_with_cache_equals_stepwise_argmax(family, method):
    torch.manual_seed(0)
    model = build(family)
    peftkit.attach(model, {"adapters": {"p": [{"method": method, "length": 4}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (1, 5))
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    running = ids
    for _ in range(6):
        next_token = model(input_ids=running, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        running = torch.cat([running, next_token], dim=1)
    assert torch.equal(generated, running)


def test_left_padded_generation_matches_each_row_alone():
    torch.manual_seed(0)
    model = build("llama")
    peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 3}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row in range(2):
        alone = ids[row : row + 1, mask[row].bool()]
        single = model.generate(alone, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[row, -4:], single[0, -4:])


def test_initialisation_from_vocabulary_and_from_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 5, "movie": 9, "was": 17}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path)
    for fields, ids in [
        ({"init": "vocab", "init_tokens": [7, 11]}, [7, 11, 7, 11, 7]),
        ({"init": "text", "init_text": "the movie was", "tokenizer": str(tmp_path)}, [5, 9, 17, 5, 9]),
    ]:
        model = build("llama")
        peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 5, **fields}]}})
        rows = model.get_input_embeddings().weight[torch.tensor(ids)]
        assert torch.equal(adapter_of(model).prompt_embedding, rows)
    with pytest.raises(peftkit.SpecError, match="init: vocab needs init_tokens"):
        peftkit.Spec.model_validate({"adapters": {"p": [{"method": "prompt", "init": "vocab"}]}})


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_encoder_folds_for_inference_and_saving(encoder, tmp_path):
    torch.manual_seed(0)
    model = build("gpt2")
    peftkit.attach(model, {"adapters": {"p": [{"method": "ptuning", "length": 4, "encoder": encoder}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (2, 5))
    before = model(input_ids=ids).logits
    peftkit.fold(model)
    assert peftkit.trainable_parameters(model).trainable == 4 * 32
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)
    peftkit.save(model, tmp_path)
    assert peftkit.read_spec(tmp_path).adapters["p"][0].encoder == "none"
    torch.manual_seed(0)
    fresh = peftkit.load(build("gpt2"), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)


def test_virtual_tokens_only_before_the_input_embeddings():
    with pytest.raises(peftkit.TargetingError, match="virtual tokens go before the model's input embeddings"):
        peftkit.plan(build("gpt2"), {"adapters": {"p": [{"method": "prompt", "target": "wpe"}]}})


def test_a_sequence_classifier_keeps_its_per_sequence_labels():
    """Labels of shape (batch,) belong to whole sequences: nothing to pad, and the loss is the head's."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    )
    peftkit.attach(model, {"adapters": {"default": [{"method": "prompt", "length": 3}]}})
    ids, labels = torch.randint(0, 100, (4, 6)), torch.tensor([0, 1, 1, 0])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits, labels)
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.bert.embeddings.word_embeddings.peftkit_adapters["default"].prompt_embedding.grad is not None
