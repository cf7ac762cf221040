"""Run by the WebUI before it parses its command line: the extension's own flags."""


def preload(parser):
    parser.add_argument(
        "--anydressing-models-dir",
        type=str,
        default=None,
        help="extra folder searched for AnyDressing models (*.safetensors), after the extension's models/anydressing",
    )
    parser.add_argument(
        "--anydressing-lowvram",
        action="store_true",
        help="move a separate GarmentsNet off the GPU as soon as garment features are extracted",
    )
