"""Textual inversion is not simulated: the database never holds embeddings."""


class EmbeddingDatabase:
    def __init__(self, tokenizer, expected_shape=-1):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.embedding_dirs = {}
        self.skipped_embeddings = {}
        self.expected_shape = expected_shape
        self.tokenizer = tokenizer
        self.fixes = []

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = path

    def load_textual_inversion_embeddings(self):
        pass

    def find_embedding_at_position(self, tokens, offset):
        return None, None
