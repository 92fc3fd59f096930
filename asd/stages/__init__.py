"""The stages of a run, each a plain function over one storage root: featurize, pretrain, pseudo_label,
finetune, embed, score and the nightly rescore."""
