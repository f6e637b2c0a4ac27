"""modules.sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords (SD1 text conditioning).

Prompts are split by ``prompt_parser.parse_prompt_attention`` (emphasis weights), tokenized
without special tokens and cut into chunks of 75 tokens; each chunk becomes
``[BOS] + tokens + [EOS]*pad`` (77 ids, padded with the EOS id as id_pad == id_end), encoded by
``wrapped.transformer``; chunks are concatenated along the token axis, so a prompt of
76..150 tokens gives (B, 154, C). "Original" emphasis: z *= multipliers, then rescaled to the
original mean. Simplified: no comma back-tracking at chunk edges, no textual inversion
embeddings.

SDXL: ``FrozenCLIPEmbedderForSDXLWithCustomWords`` (embedders[0]: hidden_states[layer_idx]); when
``id_pad != id_end`` (OpenCLIP: pad 0) the ids after the first end token become id_pad; a ``pooled``
attribute of the encoder output survives emphasis and ``forward`` returns ``(z, pooled of chunk 0)``
when ``return_pooled``.
"""
import torch

from modules import prompt_parser
from modules.shared import opts


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class TextConditionalModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from modules import sd_hijack
        self.hijack = sd_hijack.model_hijack
        self.chunk_length = 75
        self.is_trainable = False
        self.input_key = 'txt'
        self.return_pooled = False
        self.comma_token = None
        self.id_start = None
        self.id_end = None
        self.id_pad = None

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count):
        return -(-max(token_count, 1) // self.chunk_length) * self.chunk_length

    def tokenize(self, texts):
        raise NotImplementedError

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def tokenize_line(self, line):
        parsed = prompt_parser.parse_prompt_attention(line) if opts.emphasis != "None" else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])

        chunks = []
        chunk = PromptChunk()
        token_count = 0

        def close_chunk():
            nonlocal chunk, token_count
            token_count += len(chunk.tokens)
            pad = self.chunk_length - len(chunk.tokens)
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * max(pad, 0) + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * max(pad, 0) + [1.0]
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == 'BREAK' and weight == -1:
                close_chunk()
                continue
            for token in tokens:
                if len(chunk.tokens) == self.chunk_length:
                    close_chunk()
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)

        if chunk.tokens or not chunks:
            close_chunk()
        return chunks, token_count

    def process_texts(self, texts):
        token_count = 0
        cache = {}
        batch_chunks = []
        for line in texts:
            if line not in cache:
                cache[line] = self.tokenize_line(line)
            chunks, current_token_count = cache[line]
            token_count = max(current_token_count, token_count)
            batch_chunks.append(chunks)
        return batch_chunks, token_count

    def forward(self, texts):
        batch_chunks, token_count = self.process_texts(texts)
        chunk_count = max(len(x) for x in batch_chunks)
        zs = []
        for i in range(chunk_count):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            tokens = [x.tokens for x in batch_chunk]
            multipliers = [x.multipliers for x in batch_chunk]
            zs.append(self.process_tokens(tokens, multipliers))
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        tokens = torch.asarray(remade_batch_tokens)

        # this is for SD2: SD1 uses the same token for padding and end of text, while SD2 uses different ones.
        if self.id_end != self.id_pad:
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad

        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, 'pooled', None)
        if opts.emphasis != "None":
            multipliers = torch.asarray(batch_multipliers).to(z.dtype)
            original_mean = z.mean()
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
            new_mean = z.mean()
            z = z * (original_mean / new_mean)
        if pooled is not None:
            z.pooled = pooled
        return z


class FrozenCLIPEmbedderWithCustomWordsBase(TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.hijack = hijack
        self.wrapped = wrapped
        """the ldm FrozenCLIPEmbedder: ``.tokenizer`` (CLIPTokenizer) and ``.transformer`` (CLIPTextModel)"""
        self.is_trainable = getattr(wrapped, 'is_trainable', False)
        self.input_key = getattr(wrapped, 'input_key', 'txt')
        self.return_pooled = getattr(self.wrapped, 'return_pooled', False)
        self.legacy_ucg_val = None


class FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(',</w>', None)
        self.token_mults = {}
        self.id_start = self.wrapped.tokenizer.bos_token_id
        self.id_end = self.wrapped.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-opts.CLIP_stop_at_last_layers)
        if opts.CLIP_stop_at_last_layers > 1:
            z = outputs.hidden_states[-opts.CLIP_stop_at_last_layers]
            z = self.wrapped.transformer.text_model.final_layer_norm(z)
        else:
            z = outputs.last_hidden_state
        return z


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """SDXL embedders[0]: ``wrapped`` is sgm's FrozenCLIPEmbedder (layer "hidden", layer_idx 11 of 12)."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")

        if opts.sdxl_clip_l_skip is True:
            z = outputs.hidden_states[-opts.CLIP_stop_at_last_layers]
        elif self.wrapped.layer == "last":
            z = outputs.last_hidden_state
        else:
            z = outputs.hidden_states[self.wrapped.layer_idx]

        return z
