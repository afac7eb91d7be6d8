# Reference values for hierpool's spatial graph algebra (issue 19), computed independently in R:
# the ICAR precision Q = D - W of the North Carolina county graph (../hierpool/datasets/data/nc_sids_adjacency.csv)
# and the BYM2 scaling factor, the geometric mean of diag(Q^-) with Q^- = MASS::ginv(Q) (the Moore-Penrose inverse,
# which for a connected graph is the generalised inverse under the sum-to-zero constraint: Riebler et al. 2016;
# the scaling INLA's scale.model and brms's car(type = "bym2") use), and the same per connected component of a
# small graph with two components and an island.  Writes validation/spatial_reference.json; the tests read it.
#
#   Rscript validation/spatial_reference.R
library(MASS)
library(jsonlite)

laplacian <- function(labels, a, b) {
  n <- length(labels)
  W <- matrix(0, n, n, dimnames = list(labels, labels))
  W[cbind(match(a, labels), match(b, labels))] <- 1
  W[cbind(match(b, labels), match(a, labels))] <- 1
  diag(rowSums(W)) - W
}

scaling <- function(Q) exp(mean(log(diag(ginv(Q)))))

edges <- read.csv("hierpool/datasets/data/nc_sids_adjacency.csv", colClasses = "character")
labels <- sort(unique(c(edges$a, edges$b)))
Q <- laplacian(labels, edges$a, edges$b)

# a toy graph: a path a-b-c-d, a triangle e-f-g, and an island h
toy_labels <- c("a", "b", "c", "d", "e", "f", "g", "h")
toy <- list(a = c("a", "b", "c", "e", "f", "e"), b = c("b", "c", "d", "f", "g", "g"))
Qt <- laplacian(toy_labels, toy$a, toy$b)
per_component <- list(
  path = scaling(Qt[1:4, 1:4]),
  triangle = scaling(Qt[5:7, 5:7])
)

out <- list(
  generated_by = "validation/spatial_reference.R", r_version = R.version.string,
  nc_sids = list(n_areas = length(labels), n_edges = nrow(edges), rank = qr(Q)$rank,
                 degree = as.list(setNames(rowSums(Q != 0) - 1, labels)), scaling_factor = scaling(Q)),
  toy = list(labels = toy_labels, a = toy$a, b = toy$b, scaling_path = per_component$path,
             scaling_triangle = per_component$triangle)
)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "validation/spatial_reference.json")
