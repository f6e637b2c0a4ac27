"""modules.sd_hijack: ``model_hijack`` wraps the SD1 cond_stage_model in
FrozenCLIPEmbedderWithCustomWords and applies the cross-attention optimization (sdp).

SDXL (a model with ``conditioner``), as the real ``hijack``: every text embedder's token embedding
becomes ``EmbeddingsWithFixes`` (``.wrapped`` = the nn.Embedding), embedders[0] (sgm
FrozenCLIPEmbedder) is replaced by FrozenCLIPEmbedderForSDXLWithCustomWords and embedders[1]
(FrozenOpenCLIPEmbedder2) by FrozenOpenCLIPEmbedder2WithCustomWords (each keeps the original as
``.wrapped``), and ``m.cond_stage_model`` becomes the conditioner itself (two text models).
(The SD1 path here does not wrap the token embedding.)
"""
import torch

from modules import sd_hijack_clip, sd_hijack_open_clip, sd_hijack_optimizations, errors

optimizers = [sd_hijack_optimizations.SdOptimizationSdp()]
current_optimizer = None


def apply_optimizations(option=None):
    global current_optimizer
    undo_optimizations()
    current_optimizer = optimizers[0]
    current_optimizer.apply()
    return current_optimizer.name


def undo_optimizations():
    import ldm_tiny
    import sgm.modules.attention
    ldm_tiny.undo_optimizations()
    sgm.modules.attention.undo_optimizations()


class EmbeddingsWithFixes(torch.nn.Module):
    """Textual-inversion hook on the token embedding; no embeddings are ever loaded here, so it
    only forwards to ``wrapped``."""

    def __init__(self, wrapped, embeddings, textual_inversion_key='clip_l'):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if batch_fixes is None or len(batch_fixes) == 0 or max([len(x) for x in batch_fixes]) == 0:
            return inputs_embeds
        raise NotImplementedError("harness: textual inversion embeddings are not simulated")


class EmbeddingDatabase:
    """Textual inversion is not simulated: no embeddings are ever loaded."""

    def __init__(self):
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1

    def load_textual_inversion_embeddings(self, force_reload=False):
        pass

    def register_embedding(self, embedding, model):
        self.word_embeddings[embedding.name] = embedding

    def register_embedding_by_name(self, embedding, model, name):
        pass


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = EmbeddingDatabase()

    def apply_optimizations(self, option=None):
        try:
            self.optimization_method = apply_optimizations(option)
        except Exception as e:
            errors.display(e, "applying cross attention optimization")
            undo_optimizations()

    def hijack(self, m):
        conditioner = getattr(m, 'conditioner', None)
        if conditioner:
            text_cond_models = []

            for i in range(len(conditioner.embedders)):
                embedder = conditioner.embedders[i]
                typename = type(embedder).__name__
                if typename == 'FrozenCLIPEmbedder':
                    model_embeddings = embedder.transformer.text_model.embeddings
                    model_embeddings.token_embedding = EmbeddingsWithFixes(model_embeddings.token_embedding, self)
                    conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])
                if typename == 'FrozenOpenCLIPEmbedder2':
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self, textual_inversion_key='clip_g')
                    conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])

            if len(text_cond_models) == 1:
                m.cond_stage_model = text_cond_models[0]
            else:
                m.cond_stage_model = conditioner

            self.clip = m.cond_stage_model
            self.apply_optimizations()
            return

        if not isinstance(m.cond_stage_model, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.clip = m.cond_stage_model
        self.apply_optimizations()

    def undo_hijack(self, m):
        conditioner = getattr(m, 'conditioner', None)
        if conditioner:
            for i in range(len(conditioner.embedders)):
                embedder = conditioner.embedders[i]
                if isinstance(embedder, sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords):
                    embedder.wrapped.model.token_embedding = embedder.wrapped.model.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
                if isinstance(embedder, sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords):
                    embeddings = embedder.wrapped.transformer.text_model.embeddings
                    embeddings.token_embedding = embeddings.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
            if hasattr(m, 'cond_stage_model'):
                delattr(m, 'cond_stage_model')
        elif isinstance(m.cond_stage_model, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
            m.cond_stage_model = m.cond_stage_model.wrapped
        undo_optimizations()
        self.clip = None

    def apply_circular(self, enable):
        self.circular_enabled = enable

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}

    def get_prompt_lengths(self, text):
        _, token_count = self.clip.process_texts([text])
        return token_count, self.clip.get_target_prompt_token_count(token_count)


model_hijack = StableDiffusionModelHijack()
