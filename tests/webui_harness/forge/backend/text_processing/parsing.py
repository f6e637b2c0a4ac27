"""backend.text_processing.parsing: prompt attention parsing (delegates to the harness prompt_parser)."""


def parse_prompt_attention(text, emphasis):
    if emphasis == "None":
        return [[text, 1.0]]
    from modules import prompt_parser
    res = prompt_parser.parse_prompt_attention(text)
    if emphasis == "Ignore":
        res = [[t, 1.0 if w != -1 else w] for t, w in res]
    return res
