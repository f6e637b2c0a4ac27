"""Command-line options, added before the WebUI parses its arguments."""


def preload(parser):
    parser.add_argument(
        "--loraclr-output-dir",
        type=str,
        default=None,
        help="folder for merged LoRAs written by sd-webui-loraclr (default: the WebUI's Lora folder)",
    )
