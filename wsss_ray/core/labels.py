"""Label values every layer agrees on."""

# Label 255 means "ignore": VOC's object borders, a pseudo-mask's unsure pixels, a crop's padding.
IGNORE_LABEL = 255
