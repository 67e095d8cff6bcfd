"""QR decoding backends (zxing-cpp, zbar, cascade) returning raw payload bytes."""
