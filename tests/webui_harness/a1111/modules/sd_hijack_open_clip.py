"""modules.sd_hijack_open_clip: FrozenOpenCLIPEmbedder2WithCustomWords (SDXL embedders[1]).

``tokenizer`` stands in for ``open_clip.tokenizer._tokenizer`` (open_clip is not installed): the
same CLIP BPE vocabulary (sgm_tiny.get_tokenizer), with open_clip's names for the specials in
``encoder`` (``<start_of_text>`` 49406, ``<end_of_text>`` 49407) and ``encode(text)`` without them.
Ids after the first end token are padded with ``id_pad = 0`` (process_tokens), as open_clip does.
"""
import torch

from modules import sd_hijack_clip, devices
from modules.shared import opts


class _OpenClipSimpleTokenizer:
    def __init__(self):
        from sgm.modules.encoders.modules import get_tokenizer
        self._hf = get_tokenizer()
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            vocab = dict(self._hf.get_vocab())
            vocab["<start_of_text>"] = self._hf.bos_token_id
            vocab["<end_of_text>"] = self._hf.eos_token_id
            self._encoder = vocab
        return self._encoder

    def encode(self, text):
        return self._hf(text, add_special_tokens=False)["input_ids"]


tokenizer = _OpenClipSimpleTokenizer()


class FrozenOpenCLIPEmbedder2WithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)

        self.comma_token = tokenizer.encoder.get(',</w>')
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        assert not opts.use_old_emphasis_implementation, 'Old emphasis implementation not supported for Open Clip'
        return [tokenizer.encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]

        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled

        return z

    def encode_embedding_init_text(self, init_text, nvpt):
        ids = tokenizer.encode(init_text)
        ids = torch.asarray([ids], device=devices.device, dtype=torch.int)
        return self.wrapped.model.token_embedding.wrapped(ids.to(self.wrapped.model.token_embedding.wrapped.weight.device)).squeeze(0)
