"""Caption every kept image: metadata templates, BLIP captions and WD14 tags, combined
into a short (tag) caption and a long (descriptive) caption that training mixes."""
