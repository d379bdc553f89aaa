"""Explore: an interactive scatterplot of superpixel embeddings, to debug the classifier and label.

- ``projection``: what the classifier sees, projected to 2-D (UMAP, PCA, t-SNE), cached;
- ``data``: the points of a labelled dataset (with out-of-fold confusion cells) or of a run
  (with probabilities), their neighbours, clusters, explanations and pictures;
- ``page``: the Bokeh scatterplot and the HTML page around it (live or static);
- ``server``: the local HTTP server with its JSON and image endpoints.
"""
