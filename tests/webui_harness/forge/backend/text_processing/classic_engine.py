"""backend.text_processing.classic_engine.ClassicTextProcessingEngine (SD1 CLIP-L, SDXL CLIP-L / CLIP-G paths).

Chunks of 75 tokens + BOS/EOS (comma backtrack 20, ``BREAK``), emphasis multipliers, the CLIP
transformer called with ``output_hidden_states=True``, hidden state
``-max(clip_skip, minimal_clip_skip)``, then ``final_layer_norm`` when enabled; chunks are concatenated along the token axis: SD1 returns a plain tensor
(B, 77*k, C). With ``return_pooled`` (SDXL's clip_g) it returns ``(z, pooled)``: the
transformer's ``pooler_output`` (final_layer_norm at the end token), through
``transformer.text_projection`` when ``text_projection=True``. The engine wraps
``text_model.embeddings.token_embedding`` in ``CLIPEmbeddingForTextualInversion`` (``.wrapped``), as Forge does.
"""
import math
from collections import namedtuple

import torch

from backend.text_processing import parsing, emphasis
from backend.text_processing.textual_inversion import EmbeddingDatabase
from backend import memory_management

PromptChunkFix = namedtuple('PromptChunkFix', ['offset', 'embedding'])
last_extra_generation_params = {}


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key='clip_l'):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        self.embeddings.fixes = None
        return self.wrapped(input_ids)


class ClassicTextProcessingEngine:
    def __init__(self, text_encoder, tokenizer, chunk_length=75, embedding_dir=None, embedding_key='clip_l', embedding_expected_shape=768,
                 emphasis_name="Original", text_projection=False, minimal_clip_skip=1, clip_skip=1, return_pooled=False, final_layer_norm=True):
        from modules.shared import opts
        self.embeddings = EmbeddingDatabase(tokenizer, embedding_expected_shape)
        self.embedding_key = embedding_key
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.emphasis = emphasis.get_current_option(opts.emphasis)()
        self.text_projection = text_projection
        self.minimal_clip_skip = minimal_clip_skip
        self.clip_skip = clip_skip
        self.return_pooled = return_pooled
        self.final_layer_norm = final_layer_norm
        self.chunk_length = chunk_length
        self.id_start = self.tokenizer.bos_token_id
        self.id_end = self.tokenizer.eos_token_id
        self.id_pad = self.tokenizer.pad_token_id
        model_embeddings = text_encoder.transformer.text_model.embeddings
        model_embeddings.token_embedding = CLIPEmbeddingForTextualInversion(model_embeddings.token_embedding, self.embeddings, textual_inversion_key=embedding_key)
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(',</w>', None)

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count):
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        tokens = tokens.to(memory_management.text_encoder_device())
        outputs = self.text_encoder.transformer(tokens, output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = self.text_encoder.transformer.text_model.final_layer_norm(z)
        if self.return_pooled:
            pooled_output = outputs.pooler_output
            if self.text_projection:
                pooled_output = self.text_encoder.transformer.text_projection(pooled_output)
            z.pooled = pooled_output
        return z

    def tokenize_line(self, line):
        parsed = parsing.parse_prompt_attention(line, self.emphasis.name)
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last=False):
            nonlocal token_count, last_comma, chunk
            token_count += len(chunk.tokens) if is_last else self.chunk_length
            to_add = self.chunk_length - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == 'BREAK' and weight == -1:
                next_chunk()
                continue
            for token in tokens:
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif len(chunk.tokens) == self.chunk_length and last_comma != -1 and len(chunk.tokens) - last_comma <= 20:
                    break_location = last_comma + 1
                    reloc_tokens, reloc_mults = chunk.tokens[break_location:], chunk.multipliers[break_location:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:break_location], chunk.multipliers[:break_location]
                    next_chunk()
                    chunk.tokens, chunk.multipliers = reloc_tokens, reloc_mults
                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def process_texts(self, texts):
        token_count = 0
        cache = {}
        batch_chunks = []
        for line in texts:
            if line in cache:
                chunks = cache[line]
            else:
                chunks, current_token_count = self.tokenize_line(line)
                token_count = max(current_token_count, token_count)
                cache[line] = chunks
            batch_chunks.append(chunks)
        return batch_chunks, token_count

    def __call__(self, texts):
        from modules.shared import opts
        self.emphasis = emphasis.get_current_option(opts.emphasis)()
        batch_chunks, token_count = self.process_texts(texts)
        chunk_count = max(len(x) for x in batch_chunks)
        zs = []
        for i in range(chunk_count):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            self.embeddings.fixes = [x.fixes for x in batch_chunk]
            zs.append(self.process_tokens([x.tokens for x in batch_chunk], [x.multipliers for x in batch_chunk]))
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        tokens = torch.asarray(remade_batch_tokens)
        if self.id_end != self.id_pad:
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, 'pooled', None)
        self.emphasis.tokens = remade_batch_tokens
        self.emphasis.multipliers = torch.asarray(batch_multipliers).to(z)
        self.emphasis.z = z
        self.emphasis.after_transformers()
        z = self.emphasis.z
        if pooled is not None:
            z.pooled = pooled
        return z
