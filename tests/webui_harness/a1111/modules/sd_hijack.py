"""modules.sd_hijack: ``model_hijack`` wraps the SD1 cond_stage_model in
FrozenCLIPEmbedderWithCustomWords and applies the cross-attention optimization (sdp)."""
from modules import sd_hijack_clip, sd_hijack_optimizations, errors

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
    ldm_tiny.undo_optimizations()


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
        if not isinstance(m.cond_stage_model, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.clip = m.cond_stage_model
        self.apply_optimizations()

    def undo_hijack(self, m):
        if isinstance(m.cond_stage_model, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
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
