"""The digits demo's data (sklearn's bundled 8x8 digits, captioned) and its classifier judge of prompt adherence."""
