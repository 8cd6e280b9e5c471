"""Model card templates for the released ReCT components (rendered by `conversion.release`)."""

from pathlib import Path


TEMPLATE_DIR = Path(__file__).parent
