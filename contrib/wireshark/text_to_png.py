"""Render a text file (tshark's output) as a small PNG, for docs/wireshark.md.

    /usr/bin/python3 contrib/wireshark/text_to_png.py IN.txt OUT.png

Needs Pillow (Debian: python3-pil) and DejaVu Sans Mono (fonts-dejavu-core); not used by
msgd or its tests.
"""

from __future__ import annotations

import re
import sys

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"


def render(text: str, size: int = 13) -> Image.Image:
    font, bold = ImageFont.truetype(FONT, size), ImageFont.truetype(BOLD, size)
    lines = text.rstrip("\n").split("\n")
    char_w = font.getbbox("M")[2]
    line_h = size + 4
    pad = 10
    width = pad * 2 + char_w * max(len(line) for line in lines)
    image = Image.new("L", (width, pad * 2 + line_h * len(lines)), 255)
    draw = ImageDraw.Draw(image)
    for n, line in enumerate(lines):
        y = pad + n * line_h
        stripped = line.lstrip()
        if line.startswith(("$", "      -o")):
            draw.text((pad, y), line, font=bold, fill=0)
        elif line.startswith("#"):
            draw.text((pad, y), line, font=font, fill=110)
        elif line.startswith("MSGin5G") or re.match(r"Frame \d+:", line):
            draw.text((pad, y), line, font=bold, fill=0)
        else:
            draw.text((pad, y), line, font=font, fill=90 if stripped.startswith("[") else 20)
    return image


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    with open(source, encoding="utf-8") as f:
        image = render(f.read())
    image.save(target, optimize=True)


if __name__ == "__main__":
    main()
