"""Files in and out: image files (`imageio.py`: headers checked before decoding, 8/16-bit PNG, JPEG, TIFF) and
atomic writes (`files.py`)."""
