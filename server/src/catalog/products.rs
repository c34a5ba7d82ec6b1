//! `rtap.v1.ProductService`.

use entity::product;
use rtap::v1::{
    CreateProductRequest, CreateProductResponse, DeleteProductRequest, DeleteProductResponse,
    GetProductRequest, GetProductResponse, ListProductsRequest, ListProductsResponse, Product,
    UpdateProductRequest, UpdateProductResponse,
    product_service_server::{ProductService, ProductServiceServer},
};
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::NotSet,
    ColumnTrait, EntityTrait, QueryFilter, Set,
    sea_query::{Expr, ExprTrait, Func, LikeExpr},
};
use tonic::{Request, Response, Status};

use super::{
    NEXT_UPDATE_TIME, invalid,
    lookup::Lookup,
    missing, now,
    pagination::{PageRequest, SortValue, like_prefix},
    rules::{self, Violations},
    timestamp, write_error,
};
use crate::{
    database::Database,
    error::{Error, FieldViolation, quote},
};

/// The gRPC server type of the product service.
pub type ProductServer = ProductServiceServer<ProductApi>;

const SORT_FIELDS: &[&str] = &[
    "id",
    "name",
    "category",
    "price",
    "create_time",
    "update_time",
];
const MUTABLE_FIELDS: &[&str] = &["name", "category", "price"];
const OUTPUT_ONLY_FIELDS: &[&str] = &["id", "create_time", "update_time"];

/// Implements `rtap.v1.ProductService`.
#[derive(Debug, Clone)]
pub struct ProductApi {
    database: Database,
    by_id: Lookup<product::Entity>,
}

impl ProductApi {
    /// A service over `database`.
    pub fn new(database: Database) -> Self {
        let by_id = Lookup::start(
            database.clone(),
            product::Column::Id,
            |row: &product::Model| row.id,
        );
        Self { database, by_id }
    }

    /// The service, ready to add to a tonic router.
    pub fn into_server(self) -> ProductServer {
        ProductServiceServer::new(self)
    }

    async fn get(&self, request: GetProductRequest) -> Result<Product, Error> {
        let id = rules::id("id", request.id).map_err(invalid)?;
        self.by_id
            .get(id)
            .await?
            .map(to_proto)
            .ok_or_else(|| not_found(id))
    }

    async fn list(&self, request: ListProductsRequest) -> Result<ListProductsResponse, Error> {
        let mut violations = Violations::default();
        let prefix = violations.check(rules::filter("name_prefix", &request.name_prefix));
        let category = violations.check(rules::filter("category", &request.category));
        let (prefix, category) = violations.finish(prefix.zip(category))?;
        let (prefix, category) = (prefix.to_lowercase(), category.as_str());
        let page = PageRequest::parse(
            request.page_size,
            &request.order_by,
            &request.page_token,
            SORT_FIELDS,
            &[&prefix, category],
        )?;
        let mut query = product::Entity::find();
        if !prefix.is_empty() {
            query = query.filter(
                Expr::expr(Func::lower(Expr::col(product::Column::Name)))
                    .like(LikeExpr::new(like_prefix(&prefix)).escape('\\')),
            );
        }
        if !category.is_empty() {
            query = query.filter(product::Column::Category.eq(category));
        }
        let mut rows = page
            .apply(query, sort_column(page.sort_field()), product::Column::Id)
            .all(self.database.connection()?)
            .await?;
        let next_page_token = page.finish(&mut rows, |row| {
            (sort_value(row, page.sort_field()), row.id)
        });
        Ok(ListProductsResponse {
            products: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        })
    }

    async fn create(&self, request: CreateProductRequest) -> Result<Product, Error> {
        let product = request.product.ok_or_else(|| invalid(missing("product")))?;
        let mut violations = Violations::default();
        let changes = violations.check_all(ProductChanges::validate(&product, MUTABLE_FIELDS));
        let (name, category, price) =
            violations.finish(changes.and_then(|c| Some((c.name?, c.category?, c.price?))))?;
        let created = now();
        let model = product::ActiveModel {
            id: NotSet,
            name: Set(name.clone()),
            category: Set(category),
            price: Set(price),
            create_time: Set(created),
            update_time: Set(created),
        }
        .insert(self.database.connection()?)
        .await
        .map_err(|e| write_error(e, || conflict(&name)))?;
        Ok(to_proto(model))
    }

    async fn update(&self, request: UpdateProductRequest) -> Result<Product, Error> {
        let product = request.product.ok_or_else(|| invalid(missing("product")))?;
        let mut violations = Violations::default();
        let id = violations.check(rules::id("product.id", product.id));
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let fields = violations.check_all(rules::update_mask(
            &paths,
            MUTABLE_FIELDS,
            OUTPUT_ONLY_FIELDS,
        ));
        let changes = fields
            .and_then(|fields| violations.check_all(ProductChanges::validate(&product, &fields)));
        let (id, changes) = violations.finish(id.zip(changes))?;

        let mut update = product::Entity::update_many().filter(product::Column::Id.eq(id));
        if let Some(name) = &changes.name {
            update = update.col_expr(product::Column::Name, Expr::value(name.clone()));
        }
        if let Some(category) = changes.category {
            update = update.col_expr(product::Column::Category, Expr::value(category));
        }
        if let Some(price) = changes.price {
            update = update.col_expr(product::Column::Price, Expr::value(price));
        }
        let rows = update
            .col_expr(
                product::Column::UpdateTime,
                Expr::cust_with_values(NEXT_UPDATE_TIME, [now()]),
            )
            .exec_with_returning(self.database.connection()?)
            .await
            .map_err(|e| write_error(e, || conflict(changes.name.as_deref().unwrap_or(""))))?;
        rows.into_iter()
            .next()
            .map(to_proto)
            .ok_or_else(|| not_found(id))
    }

    async fn delete(&self, request: DeleteProductRequest) -> Result<(), Error> {
        let id = rules::id("id", request.id).map_err(invalid)?;
        let result = product::Entity::delete_by_id(id)
            .exec(self.database.connection()?)
            .await?;
        if result.rows_affected == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}

/// Validated new values of the fields a create or update sets.
#[derive(Debug, Default)]
struct ProductChanges {
    name: Option<String>,
    category: Option<String>,
    price: Option<f64>,
}

impl ProductChanges {
    fn validate(product: &Product, fields: &[&str]) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Violations::default();
        let mut changes = Self::default();
        for field in fields {
            match *field {
                "name" => {
                    changes.name = violations.check(rules::name("product.name", &product.name))
                }
                "category" => {
                    changes.category =
                        violations.check(rules::name("product.category", &product.category));
                }
                "price" => {
                    changes.price = violations.check(rules::price("product.price", product.price))
                }
                other => violations.add("update_mask", format!("unknown field {}", quote(other))),
            }
        }
        violations.into_result().map(|()| changes)
    }
}

fn sort_column(field: &str) -> product::Column {
    match field {
        "name" => product::Column::Name,
        "category" => product::Column::Category,
        "price" => product::Column::Price,
        "create_time" => product::Column::CreateTime,
        "update_time" => product::Column::UpdateTime,
        _ => product::Column::Id,
    }
}

fn sort_value(row: &product::Model, field: &str) -> SortValue {
    match field {
        "name" => SortValue::Text(row.name.clone()),
        "category" => SortValue::Text(row.category.clone()),
        "price" => SortValue::Float(row.price),
        "create_time" => SortValue::time(row.create_time),
        "update_time" => SortValue::time(row.update_time),
        _ => SortValue::Int(row.id),
    }
}

fn to_proto(row: product::Model) -> Product {
    Product {
        id: row.id,
        name: row.name,
        category: row.category,
        price: row.price,
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
    }
}

fn not_found(id: i64) -> Error {
    Error::NotFound(format!("product {id}"))
}

fn conflict(name: &str) -> String {
    format!("a product named {name:?} (names compare case-insensitively)")
}

#[tonic::async_trait]
impl ProductService for ProductApi {
    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<GetProductResponse>, Status> {
        let product = self.get(request.into_inner()).await?;
        Ok(Response::new(GetProductResponse {
            product: Some(product),
        }))
    }

    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn create_product(
        &self,
        request: Request<CreateProductRequest>,
    ) -> Result<Response<CreateProductResponse>, Status> {
        let product = self.create(request.into_inner()).await?;
        Ok(Response::new(CreateProductResponse {
            product: Some(product),
        }))
    }

    async fn update_product(
        &self,
        request: Request<UpdateProductRequest>,
    ) -> Result<Response<UpdateProductResponse>, Status> {
        let product = self.update(request.into_inner()).await?;
        Ok(Response::new(UpdateProductResponse {
            product: Some(product),
        }))
    }

    async fn delete_product(
        &self,
        request: Request<DeleteProductRequest>,
    ) -> Result<Response<DeleteProductResponse>, Status> {
        self.delete(request.into_inner()).await?;
        Ok(Response::new(DeleteProductResponse {}))
    }
}
