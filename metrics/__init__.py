"""The metrics: FID (Inception, `inception`; Frechet distance and KID from features, `fid_kid`), the CLIP score's
image tower (`clip_image`), and the synthetic domains' readers (`readback`: phantom-FID and caption adherence)."""
