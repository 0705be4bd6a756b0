"""Reading and writing files: checkpoints (safely, never unpickling code), memory-mapped weights, format
conversion, images in and out, and the PNG "parameters" text. No model code and no sampling here."""
